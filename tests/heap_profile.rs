//! Heap profiles from the running binary: a 150 MB Process call held halfway
//! through its body shows up in `/debug/pprof/heap` under tonic's decode path,
//! decoded by an independent pprof reader (Datadog's pprof-format, installed by
//! scripts/pprof-reader.sh); [auth] turns callers without the `admin`
//! permission away with 401/403; with [profiling] off the paths are 404; and
//! `memgate profile` writes a pprof file the reader opens and a well-formed
//! flamegraph SVG.

mod support;

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use memgate::proto::memgate_v1::{ProcessRequest, ProcessResponse};
use prost::Message as _;
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use support::process::Memgate;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MIB: usize = 1 << 20;
/// The payload memgate exists for.
const PAYLOAD: usize = 150_000_000;
const ADMIN_TOKEN: &str = "token-of-the-operator";
const PROCESS_TOKEN: &str = "token-of-a-worker";

/// Profiling on; a held call must not be cut while the profile is symbolized.
const PROFILING: &str = "[profiling]\nenabled = true\n\
                         [server]\nstream_idle_timeout = \"0s\"\nmin_throughput = \"0\"\n";

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// What the reader prints.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Decoded {
    sample_types: Vec<ValueType>,
    period_type: Option<ValueType>,
    time_nanos: i64,
    samples: Vec<Sample>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct ValueType {
    r#type: String,
    unit: String,
}

#[derive(Debug, Deserialize)]
struct Sample {
    values: Vec<i64>,
    stack: Vec<String>,
}

impl Decoded {
    /// Estimated bytes in use by samples with a frame naming each of `frames`
    /// (a path prefix, or a `<Type as Trait>` impl of it).
    fn bytes_under(&self, frames: &[&str]) -> i64 {
        self.samples
            .iter()
            .filter(|s| {
                frames.iter().all(|f| {
                    s.stack
                        .iter()
                        .any(|name| name.starts_with(f) || name.starts_with(&format!("<{f}")))
                })
            })
            .map(|s| s.values[0])
            .sum()
    }
}

/// Decodes a gzipped pprof file with the pinned reader.
fn read_profile(path: &Path) -> Decoded {
    let reader = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pprof-reader/read-profile.mjs");
    assert!(
        reader.exists(),
        "{} is missing: run scripts/pprof-reader.sh (scripts/test.sh does)",
        reader.display()
    );
    let out = Command::new("node")
        .arg(&reader)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the pprof reader refused {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// [auth] on: an operator token with `admin`, a worker token with `process` only.
fn auth_config(dir: &Path) -> String {
    let tokens = dir.join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"operator\"\nsha256 = \"{}\"\npermissions = [\"admin\"]\n\
             [[tokens]]\nname = \"worker\"\nsha256 = \"{}\"\npermissions = [\"process\"]\n",
            sha(ADMIN_TOKEN),
            sha(PROCESS_TOKEN)
        ),
    )
    .unwrap();
    format!("{PROFILING}[auth]\nenabled = true\ntokens_file = {tokens:?}\n")
}

/// A Process call over raw HTTP/2 whose body the test sends piece by piece, so
/// it can stop with the server holding the call's decode buffer.
struct HeldCall {
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    rest: Bytes,
    response: tokio::task::JoinHandle<hyper::Result<http::Response<hyper::body::Incoming>>>,
    expected_sha256: String,
}

impl HeldCall {
    /// Sends all of a `len`-byte Process request but its last MiB.
    async fn start(grpc: &str, len: usize, token: Option<&str>) -> Self {
        let data = support::payload(len, 15);
        let expected_sha256 = hex::encode(Sha256::digest(&data));
        let message = ProcessRequest { data, echo: false }.encode_to_vec();
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        drop(message);
        let framed = Bytes::from(framed);

        let addr = grpc.trim_start_matches("http://");
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (tx, rx) = mpsc::channel(1);
        let mut request = http::Request::post(format!("http://{addr}/memgate.v1.Payload/Process"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let request = request
            .body(StreamBody::new(ReceiverStream::new(rx)))
            .unwrap();
        let response = tokio::spawn(send.send_request(request));
        let held = framed.len() - MIB;
        // hyper takes a chunk only when the stream's window has room, so once
        // the last one is taken the server has read all but a window of them.
        for start in (0..held).step_by(MIB) {
            let chunk = framed.slice(start..(start + MIB).min(held));
            tx.send(Ok(Frame::data(chunk))).await.unwrap();
        }
        Self {
            tx,
            rest: framed.slice(held..),
            response,
            expected_sha256,
        }
    }

    /// Sends the rest and returns the call's answer.
    async fn finish(self) -> ProcessResponse {
        self.tx.send(Ok(Frame::data(self.rest))).await.unwrap();
        drop(self.tx);
        let response = self.response.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().unwrap_or_default();
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("0"),
            "{trailers:?}"
        );
        let bytes = body.to_bytes();
        let resp = ProcessResponse::decode(&bytes[5..]).unwrap();
        assert_eq!(resp.sha256, self.expected_sha256);
        resp
    }
}

/// Polls `/metrics` (bounded) until jemalloc's allocated bytes reach `at_least`.
async fn wait_allocated(m: &Memgate, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let allocated = m.metric("memgate_jemalloc_allocated_bytes", &[]).await;
        if allocated >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "jemalloc allocated {allocated} bytes, never {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fetch(admin: String, path: &'static str) -> reqwest::Response {
    http()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap()
}

async fn get(m: &Memgate, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = http().get(format!("http://{}{path}", m.admin));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn a_held_process_call_shows_up_under_the_decode_path() {
    let m = Memgate::start(PROFILING);
    let call = HeldCall::start(&m.grpc, PAYLOAD, None).await;
    // The decode buffer is reserved whole when the length prefix arrives.
    wait_allocated(&m, PAYLOAD as f64).await;

    let profile = tokio::spawn(fetch(m.admin.clone(), "/debug/pprof/heap"));
    // A profile is taken (and symbolized, for seconds in a debug build) on a
    // blocking thread: the probes keep answering meanwhile.
    let mut probes_during = 0;
    while !profile.is_finished() {
        for path in ["/livez", "/readyz"] {
            assert_eq!(get(&m, path, None).await.status(), StatusCode::OK, "{path}");
        }
        probes_during += usize::from(!profile.is_finished());
    }
    assert!(
        probes_during > 0,
        "the profile came back before any probe did"
    );
    let r = profile.await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("heap.pb.gz");
    std::fs::write(&file, r.bytes().await.unwrap()).unwrap();
    let p = read_profile(&file);

    assert_eq!(
        p.sample_types,
        [ValueType {
            r#type: "inuse_space".into(),
            unit: "bytes".into()
        }]
    );
    assert!(p.period_type.is_some() && p.time_nanos > 0, "{p:?}");
    // The call's 150 MB: tonic's decoder, inside the Payload service.
    let held = p.bytes_under(&[
        "tonic::codec::decode::",
        "memgate::api::payload::server::PayloadServer",
    ]);
    assert!(
        held >= PAYLOAD as i64,
        "{held} bytes under the Process decode path; stacks of the largest samples:\n{}",
        largest(&p)
    );
    // Nothing else of that size is live: the profile is about this call.
    let total: i64 = p.samples.iter().map(|s| s.values[0]).sum();
    assert!(total < held + 64 * MIB as i64, "total {total}, held {held}");

    let resp = call.finish().await;
    assert_eq!(resp.size, PAYLOAD as u64);
    assert!(m.log().contains("heap profile taken"), "{}", m.log());
}

fn largest(p: &Decoded) -> String {
    let mut samples: Vec<&Sample> = p.samples.iter().collect();
    samples.sort_by_key(|s| -s.values[0]);
    samples
        .iter()
        .take(3)
        .map(|s| format!("{} bytes: {}", s.values[0], s.stack.join(" < ")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn with_auth_only_an_admin_token_gets_a_profile() {
    let dir = tempfile::tempdir().unwrap();
    let config = auth_config(dir.path());
    let m = Memgate::start_in(dir, &config);
    for path in ["/debug/pprof/heap", "/debug/pprof/heap.svg"] {
        for anonymous in [None, Some("not-a-token")] {
            let r = get(&m, path, anonymous).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} {anonymous:?}");
            assert_eq!(
                r.headers()["www-authenticate"],
                "Bearer realm=\"memgate admin\""
            );
        }
        let r = get(&m, path, Some(PROCESS_TOKEN)).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let why = r.text().await.unwrap();
        assert!(why.contains("worker") && why.contains("Admin"), "{why}");
        let r = get(&m, path, Some(ADMIN_TOKEN)).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    // Probes and metrics stay open: the kubelet and Prometheus carry no token.
    for path in ["/livez", "/readyz", "/metrics"] {
        assert_eq!(get(&m, path, None).await.status(), StatusCode::OK, "{path}");
    }
    // No token reaches the log.
    let log = m.log();
    assert!(!log.contains(ADMIN_TOKEN) && !log.contains(PROCESS_TOKEN));
    assert!(log.contains("\"principal\":\"operator\""), "{log}");
}

#[tokio::test]
async fn with_profiling_off_the_paths_are_404_with_the_key_to_set() {
    let m = Memgate::start("");
    for path in ["/debug/pprof/heap", "/debug/pprof/heap.svg"] {
        let r = get(&m, path, None).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("[profiling] enabled = true")
        );
    }
    let out = memgate_profile(
        &m,
        &tempfile::tempdir().unwrap().path().join("h.pb.gz"),
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("[profiling] enabled = true"),
        "{err}"
    );
}

/// Runs `memgate profile` against `m`'s admin listener.
fn memgate_profile(m: &Memgate, output: &Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_memgate"))
        .args(["profile", "--admin-addr", &m.admin, "-o"])
        .arg(output)
        .env_remove("MEMGATE_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[tokio::test]
async fn memgate_profile_writes_pprof_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let config = auth_config(dir.path());
    let m = Memgate::start_in(dir, &config);
    let call = HeldCall::start(&m.grpc, 64 * MIB, Some(PROCESS_TOKEN)).await;
    wait_allocated(&m, (64 * MIB) as f64).await;
    let out_dir = tempfile::tempdir().unwrap();

    // Without a token: refused, with the way out in the message, nothing written.
    let pb = out_dir.path().join("heap.pb.gz");
    let out = memgate_profile(&m, &pb, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");
    assert!(!pb.exists());

    let token_file = out_dir.path().join("token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_memgate"))
        .args(["profile", "--admin-addr", &m.admin, "--token-file"])
        .arg(&token_file)
        .arg("-o")
        .arg(&pb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pprof heap profile"));
    let p = read_profile(&pb);
    assert!(
        p.bytes_under(&["tonic::codec::decode::"]) >= (64 * MIB) as i64,
        "{}",
        largest(&p)
    );

    let svg = out_dir.path().join("heap.svg");
    let out = memgate_profile(&m, &svg, &[("MEMGATE_TOKEN", ADMIN_TOKEN)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_flamegraph(&svg);
    call.finish().await;
}

/// The SVG is well-formed XML with an `<svg>` root, titled, and has a frame
/// for tonic's decoder among its `<title>`s (inferno writes one per frame).
fn check_flamegraph(path: &PathBuf) {
    use quick_xml::events::Event;
    let text = std::fs::read_to_string(path).unwrap();
    let mut reader = quick_xml::Reader::from_str(&text);
    let (mut root, mut in_title, mut titles, mut depth) = (None, false, Vec::new(), 0i32);
    loop {
        match reader
            .read_event()
            .unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()))
        {
            Event::Start(e) => {
                depth += 1;
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                root.get_or_insert(name.clone());
                in_title = name == "title";
            }
            Event::End(_) => {
                depth -= 1;
                in_title = false;
            }
            Event::Text(t) if in_title => titles.push(t.decode().unwrap().into_owned()),
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(depth, 0, "unbalanced elements");
    assert_eq!(root.as_deref(), Some("svg"));
    assert!(text.contains("memgate: heap in use"), "no title");
    assert!(
        titles
            .iter()
            .any(|t| t.starts_with("tonic::codec::decode::")),
        "no frame of tonic's decoder among {} frames",
        titles.len()
    );
}
