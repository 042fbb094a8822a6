//! The client side, for people and for tests: upload a file, download a blob,
//! process a payload. Files stream from and to disk; nothing is loaded whole,
//! except by `process`, whose API is one message by design.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, transport::Channel};

use crate::api::resource::{Digest, parse_read_name};
use crate::proto::bytestream::{
    QueryWriteStatusRequest, ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient,
};
use crate::proto::memgate_v1::{ProcessRequest, ProcessResponse, payload_client::PayloadClient};

/// Upload chunk size: big enough that per-message overhead vanishes, small enough
/// to stay far below the server's per-message cap.
pub const UPLOAD_CHUNK: usize = 1024 * 1024;

/// Opens a channel to `addr` (`http://host:port`).
pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("invalid address {addr:?}"))?
        .connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        // Downloads: fewer, larger frames (the server sends up to this).
        .max_frame_size(256 * 1024u32)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// The status (`SERVING`, `NOT_SERVING`, ...) of `service` in the server's
/// standard gRPC health service.
pub async fn health(addr: &str, service: &str) -> anyhow::Result<String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = connect(addr).await?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .with_context(|| format!("health check of {service:?} failed"))?;
    Ok(resp.into_inner().status().as_str_name().to_owned())
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// SHA-256 and size of a file, read in 1 MiB pieces.
pub fn digest_file(path: &Path) -> anyhow::Result<Digest> {
    digest_file_with_progress(path, &ProgressBar::hidden())
}

/// [`digest_file`], advancing `bar` as it reads.
pub fn digest_file_with_progress(path: &Path, bar: &ProgressBar) -> anyhow::Result<Digest> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        bar.set_position(size);
    }
    Ok(Digest {
        hash: hasher.finalize().into(),
        size,
    })
}

/// The upload id a resumable upload of `digest` uses, the same on every run.
pub fn stable_upload_id(digest: &Digest) -> String {
    let h = Sha256::new()
        .chain_update(b"memgate-upload\0")
        .chain_update(digest.hash)
        .finalize();
    uuid::Builder::from_random_bytes(h[..16].try_into().expect("16 bytes"))
        .into_uuid()
        .to_string()
}

/// Uploads `path`; returns the blob's read name. With `resume`, an interrupted
/// earlier upload of the same content continues where the server's copy ends.
pub async fn upload(
    channel: Channel,
    path: &Path,
    resume: bool,
    bar: &ProgressBar,
) -> anyhow::Result<String> {
    let p = path.to_path_buf();
    // The name needs the digest, so the file is hashed before the first byte goes out.
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .len();
    bar.set_length(len);
    bar.set_message("hashing");
    let hash_bar = bar.clone();
    let digest =
        tokio::task::spawn_blocking(move || digest_file_with_progress(&p, &hash_bar)).await??;
    bar.set_message("upload");
    bar.reset_eta();
    let mut client = ByteStreamClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let stable = format!("uploads/{}/blobs/{}", stable_upload_id(&digest), digest);
    let (name, offset) = match client
        .query_write_status(QueryWriteStatusRequest {
            resource_name: stable.clone(),
        })
        .await
    {
        Ok(r) if r.get_ref().complete => {
            bar.finish_and_clear();
            return Ok(digest.read_name());
        }
        Ok(r) if resume => (stable, r.get_ref().committed_size as u64),
        // An interrupted upload exists but resuming was not asked for: start afresh.
        Ok(_) => (
            format!("uploads/{}/blobs/{}", uuid::Uuid::new_v4(), digest),
            0,
        ),
        Err(s) if s.code() == Code::NotFound => (stable, 0),
        Err(s) => return Err(s).context("QueryWriteStatus failed"),
    };
    bar.set_length(digest.size);
    bar.set_position(offset);
    let (tx, rx) = mpsc::channel::<anyhow::Result<WriteRequest>>(2);
    let p = path.to_path_buf();
    let reader_bar = bar.clone();
    let first_name = name.clone();
    let size = digest.size;
    tokio::task::spawn_blocking(move || {
        let send = |r| tx.blocking_send(r).is_ok();
        let result = (|| -> anyhow::Result<()> {
            let mut file = std::fs::File::open(&p)?;
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))?;
            let mut pos = offset;
            let mut resource_name = first_name;
            loop {
                let want = UPLOAD_CHUNK.min((size - pos) as usize);
                let mut buf = BytesMut::zeroed(want);
                file.read_exact(&mut buf)
                    .with_context(|| format!("{} changed while uploading", p.display()))?;
                let finish = pos + want as u64 == size;
                let req = WriteRequest {
                    resource_name: std::mem::take(&mut resource_name),
                    write_offset: pos as i64,
                    finish_write: finish,
                    data: buf.freeze(),
                };
                pos += want as u64;
                if !send(Ok(req)) {
                    return Ok(());
                }
                reader_bar.set_position(pos);
                if finish {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = result {
            send(Err(e));
        }
    });
    // A read error ends the request stream early; the server keeps what arrived.
    let (err_tx, mut err_rx) = mpsc::channel(1);
    let requests = ReceiverStream::new(rx).map_while(move |r| match r {
        Ok(req) => Some(req),
        Err(e) => {
            let _ = err_tx.try_send(e);
            None
        }
    });
    let result = client.write(requests).await;
    if let Ok(e) = err_rx.try_recv() {
        return Err(e);
    }
    let committed = result
        .with_context(|| format!("upload of {} failed", path.display()))?
        .into_inner()
        .committed_size;
    if committed as u64 != digest.size {
        bail!("server committed {committed} of {} bytes", digest.size);
    }
    bar.finish_and_clear();
    Ok(digest.read_name())
}

/// Writes a blob whose digest the caller already knows, from `chunks` (in order,
/// each at most [`UPLOAD_CHUNK`] bytes), under a fresh upload name; returns the
/// read name. The bare gRPC status comes back on failure, so a caller can tell
/// RESOURCE_EXHAUSTED (and its `grpc-retry-pushback-ms`) from the rest. For
/// data generated in memory: a file goes through [`upload`], which hashes it first.
pub async fn write_blob<S>(
    channel: Channel,
    digest: &Digest,
    chunks: S,
    timeout: Option<Duration>,
) -> Result<String, tonic::Status>
where
    S: tokio_stream::Stream<Item = Bytes> + Send + 'static,
{
    let size = digest.size;
    let mut name = format!("uploads/{}/blobs/{digest}", uuid::Uuid::new_v4());
    let mut offset = 0u64;
    let requests = chunks.map(move |data| {
        let req = WriteRequest {
            resource_name: std::mem::take(&mut name),
            write_offset: offset as i64,
            finish_write: offset + data.len() as u64 == size,
            data,
        };
        offset += req.data.len() as u64;
        req
    });
    let mut request = tonic::Request::new(requests);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let committed = ByteStreamClient::new(channel)
        .write(request)
        .await?
        .into_inner()
        .committed_size;
    if committed as u64 != size {
        return Err(tonic::Status::data_loss(format!(
            "server committed {committed} of {size} bytes"
        )));
    }
    Ok(digest.read_name())
}

/// Downloads blob `name` into `out` (via a temporary file renamed at the end) and
/// verifies its digest.
pub async fn download(
    channel: Channel,
    name: &str,
    out: &Path,
    bar: &ProgressBar,
) -> anyhow::Result<Digest> {
    let parsed = parse_read_name(name)?;
    bar.set_length(parsed.digest.size);
    let mut client = ByteStreamClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut stream = client
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .with_context(|| format!("download of {name} failed"))?
        .into_inner();
    let tmp = temp_path(out);
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result: anyhow::Result<()> = async {
        while let Some(msg) = stream.message().await? {
            hasher.update(&msg.data);
            file.write_all(&msg.data)?;
            size += msg.data.len() as u64;
            bar.set_position(size);
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("download of {name} failed")));
    }
    let got = Digest {
        hash: hasher.finalize().into(),
        size,
    };
    if got != parsed.digest {
        let _ = std::fs::remove_file(&tmp);
        bail!("downloaded data is {got}, not {}", parsed.digest);
    }
    file.sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    bar.finish_and_clear();
    Ok(got)
}

fn temp_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.partial", std::process::id()));
    out.with_file_name(name)
}

/// Sends `data` to Payload/Process in one message.
pub async fn process(
    channel: Channel,
    data: Bytes,
    echo: bool,
) -> Result<ProcessResponse, tonic::Status> {
    let mut client = PayloadClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    Ok(client
        .process(ProcessRequest { data, echo })
        .await?
        .into_inner())
}
