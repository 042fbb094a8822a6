//! The flooder: `connections` HTTP/2 connections from a second loopback address,
//! `streams` ByteStream Write streams on each, every one declaring a large blob,
//! pushing `push` bytes as fast as the flow-control windows allow and then going
//! quiet without ending. The connections stay open and answer PINGs (the h2
//! connection task does that by itself) until [`Flooder::stop`].
//!
//! Speaks h2 directly rather than through tonic: a flooder is not a gRPC client,
//! and only h2 shows the send window, which is how it tells an admitted stream
//! (the server reads its body and returns window) from one waiting unread.

use std::{
    future::poll_fn,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use h2::client::SendRequest;
use prost::Message as _;
use tokio::{net::TcpSocket, sync::watch, task::JoinHandle};

use memgate::proto::bytestream::WriteRequest;

/// The payload each flood message carries: 1 MiB, as real clients send.
const CHUNK: usize = crate::payload::CHUNK;

/// What to flood with.
#[derive(Debug, Clone)]
pub struct FlooderOptions {
    /// The server's gRPC address.
    pub server: SocketAddr,
    /// The flooder's own address (another loopback address: another client).
    pub local_ip: IpAddr,
    pub connections: usize,
    pub streams: usize,
    /// Payload bytes each stream pushes before it goes quiet.
    pub push: u64,
    /// The blob size each stream declares in its resource name.
    pub declared: u64,
    /// The server's HTTP/2 stream window: a stream that got to send more than
    /// this was read by the server, so it was admitted.
    pub stream_window: u64,
}

/// How one flood stream ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum End {
    /// A gRPC status from the server (trailers or trailers-only).
    Status {
        code: String,
        message: String,
        pushback_ms: Option<i64>,
    },
    /// The server reset the stream.
    Reset { reason: String },
    /// The connection failed or closed under the stream.
    ConnectionLost { message: String },
    /// Still open when the flood ended.
    Open,
    /// Never got a stream slot (the server's `max_concurrent_streams`) before the end.
    NeverOpened,
}

/// One flood stream. Times are seconds since the run's origin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamRecord {
    pub connection: usize,
    pub stream: usize,
    /// When the server granted it its first byte of window (it was open there).
    pub opened: Option<f64>,
    /// Payload bytes pushed.
    pub pushed: u64,
    /// When the server was first seen reading its body.
    pub admitted: Option<f64>,
    pub ended: Option<f64>,
    #[serde(flatten)]
    pub end: End,
}

/// What the flooder has at this moment; read by the sampler.
#[derive(Debug, Default)]
pub struct Live {
    /// Streams open at the server (granted window) and not answered.
    pub open: AtomicU64,
    /// Of those, streams the server was seen reading.
    pub admitted_open: AtomicU64,
    /// Payload bytes pushed into the open streams.
    pub bytes_open: AtomicU64,
    /// Payload bytes pushed into the admitted open streams.
    pub bytes_admitted_open: AtomicU64,
}

/// A running flood; [`Flooder::stop`] ends it and returns every stream.
pub struct Flooder {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Vec<StreamRecord>>>,
    pub live: Arc<Live>,
    /// Connections that could not be made, with the reason.
    pub connect_errors: Arc<Mutex<Vec<String>>>,
}

impl Flooder {
    /// Connects and starts every stream; returns at once.
    pub fn start(opts: &FlooderOptions, origin: Instant) -> Flooder {
        let (stop, stopped) = watch::channel(false);
        let live = Arc::new(Live::default());
        let connect_errors = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..opts.connections)
            .map(|c| {
                let (opts, live, stopped) = (opts.clone(), live.clone(), stopped.clone());
                let errors = connect_errors.clone();
                tokio::spawn(async move {
                    connection(c, &opts, origin, live, stopped)
                        .await
                        .unwrap_or_else(|e| {
                            errors
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("connection {c}: {e:#}"));
                            Vec::new()
                        })
                })
            })
            .collect();
        Flooder {
            stop,
            tasks,
            live,
            connect_errors,
        }
    }

    /// Ends the flood: open streams are recorded as such, then reset, and the
    /// connections closed.
    pub async fn stop(self) -> Vec<StreamRecord> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap_or_default());
        }
        all
    }
}

/// One connection: its streams, opened one after the other as the server's
/// stream limit lets them, each on a task of its own.
async fn connection(
    c: usize,
    opts: &FlooderOptions,
    origin: Instant,
    live: Arc<Live>,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<Vec<StreamRecord>> {
    let socket = match opts.local_ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(opts.local_ip, 0))
        .with_context(|| format!("cannot bind to {}", opts.local_ip))?;
    let tcp = socket
        .connect(opts.server)
        .await
        .with_context(|| format!("cannot connect to {}", opts.server))?;
    tcp.set_nodelay(true)?;
    let (h2, conn) = h2::client::Builder::new()
        // Its own receive side hardly matters; the send side must not cap the
        // capacity h2 reports below the window, or admission could not be seen.
        .max_send_buffer_size(opts.stream_window as usize + 2 * CHUNK)
        .handshake::<_, Bytes>(tcp)
        .await
        .context("HTTP/2 handshake")?;
    // Drives the connection (and answers the server's PINGs) until it closes.
    let driver = tokio::spawn(conn);
    let data = Bytes::from(vec![0u8; CHUNK]);
    let mut tasks = Vec::new();
    let mut never_opened = 0;
    for s in 0..opts.streams {
        // At most one stream waits for a slot at a time (h2's `ready`).
        let ready = tokio::select! {
            r = h2.clone().ready() => r,
            () = until_stopped(&mut stopped) => {
                never_opened = opts.streams - s;
                break;
            }
        };
        let Ok(h2) = ready else {
            never_opened = opts.streams - s;
            break;
        };
        let (opts, live, stopped, data) =
            (opts.clone(), live.clone(), stopped.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            stream(h2, c, s, &opts, origin, &live, stopped, data).await
        }));
    }
    let mut records = Vec::new();
    for task in tasks {
        if let Ok(r) = task.await {
            records.push(r);
        }
    }
    for s in opts.streams - never_opened..opts.streams {
        records.push(StreamRecord {
            connection: c,
            stream: s,
            opened: None,
            pushed: 0,
            admitted: None,
            ended: None,
            end: End::NeverOpened,
        });
    }
    drop(h2);
    driver.abort();
    Ok(records)
}

/// Resolves once the flood is told to stop (or its sender is gone); holds no
/// borrow of the channel's value across an await.
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Releases what a stream holds in [`Live`] when it ends, however it ends.
struct Holding<'a> {
    live: &'a Live,
    open: bool,
    admitted: bool,
    pushed: u64,
}

impl Holding<'_> {
    fn pushed(&mut self, n: u64) {
        if !self.open {
            self.open = true;
            self.live.open.fetch_add(1, Ordering::Relaxed);
        }
        self.pushed += n;
        self.live.bytes_open.fetch_add(n, Ordering::Relaxed);
        if self.admitted {
            self.live
                .bytes_admitted_open
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    fn admitted(&mut self) {
        if !self.admitted {
            self.admitted = true;
            self.live.admitted_open.fetch_add(1, Ordering::Relaxed);
            self.live
                .bytes_admitted_open
                .fetch_add(self.pushed, Ordering::Relaxed);
        }
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if self.open {
            self.live.open.fetch_sub(1, Ordering::Relaxed);
            self.live
                .bytes_open
                .fetch_sub(self.pushed, Ordering::Relaxed);
        }
        if self.admitted {
            self.live.admitted_open.fetch_sub(1, Ordering::Relaxed);
            self.live
                .bytes_admitted_open
                .fetch_sub(self.pushed, Ordering::Relaxed);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    mut h2: SendRequest<Bytes>,
    c: usize,
    s: usize,
    opts: &FlooderOptions,
    origin: Instant,
    live: &Live,
    mut stopped: watch::Receiver<bool>,
    data: Bytes,
) -> StreamRecord {
    let now = || origin.elapsed().as_secs_f64();
    let mut rec = StreamRecord {
        connection: c,
        stream: s,
        opened: None,
        pushed: 0,
        admitted: None,
        ended: None,
        end: End::Open,
    };
    let req = http::Request::post(format!(
        "http://{}/google.bytestream.ByteStream/Write",
        opts.server
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("a valid request");
    let (response, mut send) = match h2.send_request(req, false) {
        Ok(pair) => pair,
        Err(e) => {
            rec.end = End::ConnectionLost {
                message: e.to_string(),
            };
            rec.ended = Some(now());
            return rec;
        }
    };
    let mut holding = Holding {
        live,
        open: false,
        admitted: false,
        pushed: 0,
    };
    let name = flood_resource_name(c, s, opts.declared);
    let end = {
        let push = push_then_wait(
            &mut send,
            &name,
            &data,
            opts,
            &mut holding,
            &mut rec,
            origin,
        );
        // The answer, body and trailers included, so that the stop cuts it too.
        let answer = async { ended(response.await).await };
        let mut stopped_later = stopped.clone();
        tokio::pin!(push, answer);
        tokio::select! {
            end = &mut answer => end,
            // Ends only when the stream can no longer send: its answer follows.
            () = &mut push => tokio::select! {
                end = &mut answer => end,
                () = until_stopped(&mut stopped_later) => End::Open,
            },
            () = until_stopped(&mut stopped) => End::Open,
        }
    };
    if end == End::Open {
        send.send_reset(h2::Reason::CANCEL);
    } else {
        rec.ended = Some(now());
    }
    rec.pushed = holding.pushed;
    rec.end = end;
    rec
}

/// Pushes `opts.push` bytes in 1 MiB WriteRequests as the window allows, then
/// sends nothing more but watches the window: a stream that gets more than the
/// server's initial window was read, i.e. admitted. Returns only when the
/// stream can no longer send (answered or reset).
async fn push_then_wait(
    send: &mut h2::SendStream<Bytes>,
    name: &str,
    data: &Bytes,
    opts: &FlooderOptions,
    holding: &mut Holding<'_>,
    rec: &mut StreamRecord,
    origin: Instant,
) {
    let window = opts.stream_window;
    let mut sent = 0u64;
    let mut offset = 0u64;
    let saw_read = |holding: &mut Holding, rec: &mut StreamRecord| {
        if rec.admitted.is_none() {
            rec.admitted = Some(origin.elapsed().as_secs_f64());
            holding.admitted();
        }
    };
    while offset < opts.push {
        let len = (opts.push - offset).min(CHUNK as u64) as usize;
        let head = message_head(if offset == 0 { name } else { "" }, offset, len);
        let pieces = [head, data.slice(..len)];
        for (i, mut piece) in pieces.into_iter().enumerate() {
            while !piece.is_empty() {
                let Some(cap) = capacity(send, piece.len()).await else {
                    return;
                };
                if rec.opened.is_none() {
                    rec.opened = Some(origin.elapsed().as_secs_f64());
                }
                let part = piece.split_to(cap.min(piece.len()));
                let n = part.len() as u64;
                if send.send_data(part, false).is_err() {
                    return;
                }
                sent += n;
                // Only the payload counts as pushed; the framing is a few bytes.
                holding.pushed(if i == 1 { n } else { 0 });
                if sent > window {
                    saw_read(holding, rec);
                }
            }
        }
        offset += len as u64;
    }
    // Quiet from here. Without a WINDOW_UPDATE the stream's capacity stays at
    // most `window - sent`; asking for one byte more and getting it means the
    // server read the body.
    while rec.admitted.is_none() {
        let need = (window + 1).saturating_sub(sent) as usize;
        send.reserve_capacity(need);
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(cap)) if cap >= need => saw_read(holding, rec),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
    // Give the unused capacity back to the connection and wait for the end.
    send.reserve_capacity(0);
    let _ = poll_fn(|cx| send.poll_reset(cx)).await;
}

/// Waits until the stream may send; `None` once it cannot send any more.
async fn capacity(send: &mut h2::SendStream<Bytes>, want: usize) -> Option<usize> {
    send.reserve_capacity(want);
    loop {
        let now = send.capacity();
        if now > 0 {
            return Some(now);
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

/// How the response (headers, maybe a body, trailers) ended the stream.
async fn ended(response: Result<http::Response<h2::RecvStream>, h2::Error>) -> End {
    let response = match response {
        Ok(r) => r,
        Err(e) => return lost(&e),
    };
    if let Some(end) = status_in(response.headers()) {
        return end;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
            }
            Err(e) => return lost(&e),
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => status_in(&trailers).unwrap_or(End::Status {
            code: "UNKNOWN".into(),
            message: "trailers without grpc-status".into(),
            pushback_ms: None,
        }),
        Ok(None) => End::Status {
            code: "UNKNOWN".into(),
            message: "the response ended without trailers".into(),
            pushback_ms: None,
        },
        Err(e) => lost(&e),
    }
}

fn lost(e: &h2::Error) -> End {
    match e.reason() {
        Some(reason) if e.is_reset() => End::Reset {
            reason: format!("{reason:?}"),
        },
        _ => End::ConnectionLost {
            message: e.to_string(),
        },
    }
}

/// The gRPC status in `headers` (trailers, or a trailers-only response).
fn status_in(headers: &http::HeaderMap) -> Option<End> {
    let text = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    let code: i32 = text("grpc-status")?.trim().parse().ok()?;
    Some(End::Status {
        code: crate::calls::code_name(tonic::Code::from_i32(code)),
        message: text("grpc-message").unwrap_or_default().to_string(),
        pushback_ms: text("grpc-retry-pushback-ms").and_then(|v| v.trim().parse().ok()),
    })
}

/// A distinct upload of a distinct (never completed) blob per stream.
fn flood_resource_name(c: usize, s: usize, declared: u64) -> String {
    use sha2::{Digest as _, Sha256};
    let hash = Sha256::new()
        .chain_update(b"memgate-bench flood\0")
        .chain_update((c as u64).to_be_bytes())
        .chain_update((s as u64).to_be_bytes())
        .chain_update(std::process::id().to_be_bytes())
        .finalize();
    let h = hex::encode(&hash[..16]);
    let upload = format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    format!("uploads/{upload}/blobs/{}/{declared}", hex::encode(hash))
}

/// The gRPC length prefix and the protobuf bytes of a WriteRequest up to its
/// `data` field; the data itself follows as a shared `Bytes`, so a thousand
/// streams need no copies of it.
fn message_head(name: &str, offset: u64, len: usize) -> Bytes {
    let fields = WriteRequest {
        resource_name: name.to_string(),
        write_offset: offset as i64,
        finish_write: false,
        data: Bytes::new(),
    }
    .encode_to_vec();
    let mut data_key = Vec::with_capacity(11);
    // Field 10 (`data`), wire type 2 (length-delimited).
    prost::encoding::encode_key(
        10,
        prost::encoding::WireType::LengthDelimited,
        &mut data_key,
    );
    prost::encoding::encode_varint(len as u64, &mut data_key);
    let message_len = fields.len() + data_key.len() + len;
    let mut head = BytesMut::with_capacity(5 + fields.len() + data_key.len());
    head.put_u8(0);
    head.put_u32(u32::try_from(message_len).expect("a 1 MiB message"));
    head.put_slice(&fields);
    head.put_slice(&data_key);
    head.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_head_and_its_data_are_one_write_request() {
        let data = Bytes::from(vec![7u8; 1000]);
        let head = message_head("uploads/x/blobs/y/150000000", 2 << 20, data.len());
        let mut frame = head.to_vec();
        frame.extend_from_slice(&data);
        assert_eq!(frame[0], 0, "not compressed");
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 5);
        let decoded = WriteRequest::decode(&frame[5..]).unwrap();
        assert_eq!(decoded.resource_name, "uploads/x/blobs/y/150000000");
        assert_eq!(decoded.write_offset, 2 << 20);
        assert!(!decoded.finish_write);
        assert_eq!(decoded.data, data);
    }

    #[test]
    fn flood_names_parse_and_differ() {
        let a = flood_resource_name(0, 1, 150_000_000);
        let b = flood_resource_name(1, 0, 150_000_000);
        assert_ne!(a, b);
        let parsed = memgate::api::resource::parse_write_name(&a).unwrap();
        assert_eq!(parsed.digest.size, 150_000_000);
    }

    #[test]
    fn statuses_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(status_in(&h), None);
        h.insert("grpc-status", "8".parse().unwrap());
        h.insert("grpc-message", "busy".parse().unwrap());
        h.insert("grpc-retry-pushback-ms", "1200".parse().unwrap());
        assert_eq!(
            status_in(&h),
            Some(End::Status {
                code: "RESOURCE_EXHAUSTED".into(),
                message: "busy".into(),
                pushback_ms: Some(1200),
            })
        );
    }
}
