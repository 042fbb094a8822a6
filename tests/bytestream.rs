//! ByteStream against a real in-process server on `127.0.0.1:0` with a real tonic
//! client: large round trips, resumable uploads, the CLI's client functions, the
//! gRPC code of every kind of bad input (and proof that stored blobs survive it),
//! and garbage collection of abandoned partial uploads.

mod support;
mod support_s3;

use std::{path::Path, time::Duration};

use bytes::Bytes;
use memgate::{
    api::resource::{Digest, parse_write_name},
    config::StorageConfig,
    proto::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient},
    store::{BlobStore, LocalStore, StoreError},
};
use support::*;
use support_s3::{Kind, Storage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};

const MIB: usize = 1 << 20;
const CHUNK: usize = MIB;
/// The size the server is built for: 150 MB.
const BIG: usize = 150 * 1000 * 1000;
const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The `.part` files in the server's upload directory.
fn partials(data_dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("uploads")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .collect()
}

/// Sends `rest` from `offset` with `finish_write`, then checks the commit and that
/// the whole blob reads back as `data`.
async fn finish_and_verify(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    rest: &Bytes,
    offset: u64,
    data: &Bytes,
) {
    let resp = client
        .write(tokio_stream::iter(write_requests(
            name, rest, offset, CHUNK, true,
        )))
        .await
        .expect("resumed Write");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    let d = digest(data);
    assert_eq!(read_digest(client, &d.read_name()).await.expect("Read"), d);
}

async fn round_trip_of_a_150mb_blob(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(BIG, 1);
    let d = digest(&data);
    let name = write_name(&d);

    let resp = client
        .write(write_stream(&name, &data, CHUNK))
        .await
        .expect("Write");
    assert_eq!(resp.into_inner().committed_size, BIG as i64);
    assert_eq!(
        query(&mut client, &name).await.expect("QueryWriteStatus"),
        (BIG as i64, true)
    );
    assert_eq!(
        storage.stored(server.data_dir()).await,
        [storage.blob_entry(server.data_dir(), &d.hex())],
        "the partial upload must become the blob, and nothing else stays"
    );

    // The whole blob, checking that it arrives in read_chunk_size pieces.
    let mut stream = client
        .read(ReadRequest {
            resource_name: d.read_name(),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .expect("Read")
        .into_inner();
    let chunk_cap = server.config().storage.read_chunk_size.as_u64() as usize;
    let mut got = Vec::with_capacity(BIG);
    while let Some(msg) = stream.message().await.expect("Read stream") {
        assert!(
            msg.data.len() <= chunk_cap,
            "a {} byte ReadResponse",
            msg.data.len()
        );
        got.extend_from_slice(&msg.data);
    }
    assert_eq!(digest(&got), d);
    drop(got);

    // Slices: read_offset and read_limit give exactly [offset, offset + limit).
    for (offset, limit) in [
        (0, 1),
        (1, 0),
        (12_345_678, 3_000_001),
        (BIG - 10, 0),
        (BIG - 10, 100),
        (BIG, 0),
    ] {
        let slice = read(&mut client, &d.read_name(), offset as i64, limit as i64)
            .await
            .unwrap_or_else(|s| panic!("Read({offset}, {limit}): {s:?}"));
        let end = if limit == 0 {
            BIG
        } else {
            (offset + limit).min(BIG)
        };
        assert!(
            slice == data[offset..end],
            "Read({offset}, {limit}) returned the wrong bytes"
        );
    }
    server.stop().await;
}

async fn upload_resumes_after_the_client_disconnects(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(48 * MIB + 3, 2);
    let d = digest(&data);
    let name = write_name(&d);

    // A writer on its own connection, fed by hand, killed mid-upload.
    let (tx, rx) = mpsc::channel::<WriteRequest>(2);
    let mut writer = server.bytestream();
    let task = tokio::spawn(async move { writer.write(ReceiverStream::new(rx)).await });
    let requests = write_requests(&name, &data, 0, CHUNK, true);
    let (sent, all_sent) = tokio::sync::oneshot::channel();
    let feeder = tokio::spawn(async move {
        for r in requests.into_iter().take(24) {
            if tx.send(r).await.is_err() {
                return;
            }
        }
        let _ = sent.send(());
        // Keep the stream open (no half-close): the end comes from the abort.
        std::future::pending::<()>().await;
    });
    match kind {
        // Local disk: QueryWriteStatus reports bytes as they land.
        Kind::Local => {
            wait_for_committed(&mut client, &name, |c| c >= 4 * MIB as i64).await;
        }
        // S3: what a stream receives becomes a staging object when the stream
        // ends. The client handing over 24 MiB means the server took most of it
        // (the HTTP/2 window holds 4 MiB).
        Kind::S3 => all_sent.await.expect("the feeder sent 24 messages"),
    }
    task.abort();
    assert!(task.await.expect_err("aborted").is_cancelled());
    if kind == Kind::S3 {
        wait_for_committed(&mut client, &name, |c| c > 0).await;
    }

    // The stream is gone: QueryWriteStatus waits for its last chunk to land and
    // answers where a resumed Write must start.
    let committed = query(&mut client, &name).await.expect("QueryWriteStatus").0;
    feeder.abort();
    assert!(
        committed > 0 && committed < data.len() as i64,
        "committed {committed}"
    );
    assert_eq!(committed % CHUNK as i64, 0, "only whole messages are kept");

    // A wrong offset is refused and names the right one.
    for wrong in [0, committed - 1, committed + CHUNK as i64] {
        let status = expect_code(
            {
                let mut c = server.bytestream();
                let reqs = write_requests(
                    &name,
                    &data.slice(wrong as usize..),
                    wrong as u64,
                    CHUNK,
                    true,
                );
                c.write(tokio_stream::iter(reqs)).await
            },
            Code::InvalidArgument,
            "Write at a wrong offset",
        );
        assert!(
            status.message().contains(&committed.to_string()),
            "message should name the expected offset {committed}: {:?}",
            status.message()
        );
    }

    // The wrong offsets were refused for their offset, not as a second writer,
    // and changed nothing.
    assert_eq!(
        query(&mut client, &name).await.expect("QueryWriteStatus").0,
        committed
    );

    // The right offset completes the blob.
    let rest = write_requests(
        &name,
        &data.slice(committed as usize..),
        committed as u64,
        CHUNK,
        true,
    );
    let resp = {
        let mut c = server.bytestream();
        let reqs = rest;
        c.write(tokio_stream::iter(reqs)).await
    }
    .expect("resumed Write");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    assert_eq!(
        query(&mut client, &name).await.expect("QueryWriteStatus"),
        (data.len() as i64, true)
    );
    assert_eq!(
        read_digest(&mut client, &d.read_name())
            .await
            .expect("Read"),
        d
    );
    server.stop().await;
}

async fn half_closed_write_reports_what_was_committed_and_resumes(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(5 * MIB + 17, 3);
    let d = digest(&data);
    let name = write_name(&d);

    // The stream ends without finish_write: a pause, not an error.
    let first = Bytes::copy_from_slice(&data[..2 * MIB + 1]);
    let resp = client
        .write(tokio_stream::iter(write_requests(
            &name, &first, 0, CHUNK, false,
        )))
        .await
        .expect("paused Write");
    assert_eq!(resp.into_inner().committed_size, first.len() as i64);
    assert_eq!(
        query(&mut client, &name).await.expect("QueryWriteStatus"),
        (first.len() as i64, false)
    );
    assert_eq!(
        expect_code(
            read_digest(&mut client, &d.read_name()).await,
            Code::NotFound,
            "Read of an unfinished blob"
        )
        .code(),
        Code::NotFound
    );

    let rest = data.slice(first.len()..);
    finish_and_verify(&mut client, &name, &rest, first.len() as u64, &data).await;
    server.stop().await;
}

async fn upload_resumes_after_a_server_restart(kind: Kind) {
    let storage = Storage::new(kind);
    let dir = tempfile::tempdir().expect("data dir");
    let data = payload(6 * MIB + 5, 6);
    let d = digest(&data);
    let name = write_name(&d);
    let head = data.slice(..3 * MIB);

    let server = TestServer::start_in(dir.path(), |c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 7).await;
    let resp = client
        .write(tokio_stream::iter(write_requests(
            &name, &head, 0, CHUNK, false,
        )))
        .await
        .expect("first part");
    assert_eq!(resp.into_inner().committed_size, head.len() as i64);
    drop(client);
    server.stop().await;

    let server = TestServer::start_in(dir.path(), |c| storage.configure(c)).await;
    let mut client = server.bytestream();
    assert_eq!(
        query(&mut client, &name).await.expect("QueryWriteStatus"),
        (head.len() as i64, false)
    );
    stored.assert_intact(&mut client, "a restart").await;
    let rest = data.slice(head.len()..);
    finish_and_verify(&mut client, &name, &rest, head.len() as u64, &data).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_upload_continues_an_interrupted_upload_and_download_verifies() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.bytestream();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("input.bin");
    let data = payload(20 * MIB + 7, 4);
    std::fs::write(&file, &data).expect("writing the input file");
    let d = digest(&data);

    // An earlier run sent the first 5 MiB under the stable upload id, then stopped.
    let stable = write_name_with(&memgate::client::stable_upload_id(&d), &d);
    let head = data.slice(..5 * MIB);
    let resp = client
        .write(tokio_stream::iter(write_requests(
            &stable, &head, 0, CHUNK, false,
        )))
        .await
        .expect("first part");
    assert_eq!(resp.into_inner().committed_size, 5 * MIB as i64);

    let bar = indicatif::ProgressBar::hidden();
    let read_name = memgate::client::upload(server.channel(), &file, true, &bar)
        .await
        .expect("resumed upload");
    assert_eq!(read_name, d.read_name());
    assert_eq!(
        query(&mut client, &stable).await.expect("QueryWriteStatus"),
        (d.size as i64, true)
    );
    // Had the client started afresh under another id, the stable partial would remain.
    assert!(
        partials(server.data_dir()).is_empty(),
        "leftover partials: {:?}",
        partials(server.data_dir())
    );

    let out = dir.path().join("output.bin");
    let got = memgate::client::download(server.channel(), &read_name, &out, &bar)
        .await
        .expect("download");
    assert_eq!(got, d);
    assert!(
        std::fs::read(&out).expect("downloaded file") == data,
        "downloaded bytes differ"
    );

    // Corrupt the stored blob on disk (same length): download must refuse it.
    let blob = server
        .data_dir()
        .join("blobs")
        .join(&d.hex()[..2])
        .join(d.hex());
    let mut stored = std::fs::read(&blob).expect("stored blob file");
    stored[10 * MIB] ^= 0x55;
    std::fs::write(&blob, &stored).expect("corrupting the blob");
    let bad_out = dir.path().join("corrupt.bin");
    let err = memgate::client::download(server.channel(), &read_name, &bad_out, &bar)
        .await
        .expect_err("download of a corrupted blob");
    assert!(format!("{err:#}").contains("downloaded data is"), "{err:#}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("corrupt.bin"))
        .collect();
    assert!(leftovers.is_empty(), "a failed download left {leftovers:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_upload_without_resume_starts_afresh() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.bytestream();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("input.bin");
    let data = payload(3 * MIB + 1, 5);
    std::fs::write(&file, &data).expect("writing the input file");
    let d = digest(&data);
    let stable = write_name_with(&memgate::client::stable_upload_id(&d), &d);
    client
        .write(tokio_stream::iter(write_requests(
            &stable,
            &data.slice(..MIB),
            0,
            CHUNK,
            false,
        )))
        .await
        .expect("first part");

    let bar = indicatif::ProgressBar::hidden();
    let read_name = memgate::client::upload(server.channel(), &file, false, &bar)
        .await
        .expect("fresh upload");
    assert_eq!(read_name, d.read_name());
    assert_eq!(read_digest(&mut client, &read_name).await.expect("Read"), d);
    server.stop().await;
}

async fn malformed_names_are_invalid_argument(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 10).await;
    let real = stored.digest.hex();

    let read_names = [
        String::new(),
        format!("blob/{real}/{}", stored.digest.size),
        format!("blobs/{real}"),
        format!("blobs/{}/{}", real.to_uppercase(), stored.digest.size),
        format!("blobs/{}/{}", &real[1..], stored.digest.size),
        format!("blobs/{real}/-1"),
        format!("blobs/{real}/0x10"),
        format!("../blobs/{real}/{}", stored.digest.size),
        format!("a/b/blobs/{real}/{}", stored.digest.size),
        format!("uploads/u/blobs/{real}/{}", stored.digest.size),
        "x".repeat(2000),
    ];
    for name in &read_names {
        let r = read(&mut client, name, 0, 0).await;
        expect_code(r, Code::InvalidArgument, &format!("Read({name:.80})"));
        stored
            .assert_intact(&mut client, &format!("Read({name:.80})"))
            .await;
    }

    let data = payload(100, 11);
    let d = digest(&data);
    let write_names = [
        String::new(),
        d.read_name(),
        format!("uploads//blobs/{d}"),
        format!("uploads/../blobs/{d}"),
        format!("uploads/a.b/blobs/{d}"),
        format!("../uploads/u/blobs/{d}"),
        format!("uploads/u/../../blobs/{d}"),
        format!("uploads/u/blobs/{}/x", d.hex()),
        format!("uploads/u/blobs/{H}0/{}", d.size),
        format!("uploads/u/blobs/{}/{}", stored.digest.hex(), "9".repeat(25)),
    ];
    for name in &write_names {
        let r = client.write(write_stream(name, &data, CHUNK)).await;
        expect_code(r, Code::InvalidArgument, &format!("Write({name})"));
        let r = query(&mut client, name).await;
        expect_code(
            r,
            Code::InvalidArgument,
            &format!("QueryWriteStatus({name})"),
        );
        stored
            .assert_intact(&mut client, &format!("Write({name})"))
            .await;
    }
    assert!(
        storage.partials(server.data_dir()).await.is_empty(),
        "a refused name created a partial upload"
    );
    server.stop().await;
}

async fn negative_offsets_and_limits_are_refused(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 20).await;
    let name = stored.digest.read_name();

    // The spec: a negative read_offset is OUT_OF_RANGE, a negative read_limit
    // "an error" (INVALID_ARGUMENT); the offset is checked first.
    for (offset, limit, code) in [
        (-1, 0, Code::OutOfRange),
        (0, -1, Code::InvalidArgument),
        (i64::MIN, 10, Code::OutOfRange),
        (-5, -5, Code::OutOfRange),
    ] {
        let s = expect_code(
            read(&mut client, &name, offset, limit).await,
            code,
            &format!("Read({offset}, {limit})"),
        );
        assert!(
            s.message().contains("must not be negative"),
            "{:?}",
            s.message()
        );
        stored.assert_intact(&mut client, "a negative read").await;
    }

    // Negative write_offset in the first message, then in a later one.
    let data = payload(2 * MIB, 21);
    let d = digest(&data);
    let wname = write_name(&d);
    let mut reqs = write_requests(&wname, &data, 0, CHUNK, true);
    reqs[0].write_offset = -1;
    let s = expect_code(
        client.write(tokio_stream::iter(reqs)).await,
        Code::InvalidArgument,
        "Write at -1",
    );
    assert!(s.message().contains("write_offset"), "{:?}", s.message());
    stored
        .assert_intact(&mut client, "a negative first write_offset")
        .await;

    let wname = write_name(&d);
    let mut reqs = write_requests(&wname, &data, 0, CHUNK, true);
    reqs[1].write_offset = -5;
    let s = expect_code(
        client.write(tokio_stream::iter(reqs)).await,
        Code::InvalidArgument,
        "second message at -5",
    );
    assert!(
        s.message().contains(&MIB.to_string()),
        "should name the expected offset: {:?}",
        s.message()
    );
    expect_code(
        read_digest(&mut client, &d.read_name()).await,
        Code::NotFound,
        "Read after refused writes",
    );
    stored
        .assert_intact(&mut client, "a negative later write_offset")
        .await;
    server.stop().await;
}

async fn wrong_digest_on_finish_stores_nothing(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 30).await;

    let data = payload(2 * MIB + 9, 31);
    let actual = digest(&data);
    let claimed = digest(&payload(2 * MIB + 9, 32));
    assert_eq!(actual.size, claimed.size);
    let name = write_name(&claimed);
    let s = expect_code(
        client.write(write_stream(&name, &data, CHUNK)).await,
        Code::InvalidArgument,
        "Write with the wrong digest",
    );
    assert!(
        s.message().contains(&claimed.hex()),
        "should name the expected digest: {:?}",
        s.message()
    );
    assert!(
        s.message().contains(&actual.hex()),
        "should name the actual digest: {:?}",
        s.message()
    );

    expect_code(
        read_digest(&mut client, &claimed.read_name()).await,
        Code::NotFound,
        "Read(claimed)",
    );
    expect_code(
        read_digest(&mut client, &actual.read_name()).await,
        Code::NotFound,
        "Read(actual)",
    );
    expect_code(
        query(&mut client, &name).await,
        Code::NotFound,
        "QueryWriteStatus after a mismatch",
    );
    // The store's own listing (the bucket, for S3) holds the earlier blob and nothing else.
    assert!(storage.partials(server.data_dir()).await.is_empty());
    assert_eq!(
        storage.stored(server.data_dir()).await,
        [storage.blob_entry(server.data_dir(), &stored.digest.hex())]
    );
    stored.assert_intact(&mut client, "a digest mismatch").await;
    server.stop().await;
}

async fn fewer_bytes_than_declared_at_finish_is_invalid_argument(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 40).await;

    let data = payload(MIB + 100, 41);
    // The right hash of what is sent, but a larger declared size.
    let claimed = Digest {
        size: data.len() as u64 + 1,
        ..digest(&data)
    };
    let name = write_name(&claimed);
    let s = expect_code(
        client.write(write_stream(&name, &data, CHUNK)).await,
        Code::InvalidArgument,
        "finish before the declared size",
    );
    assert!(
        s.message().contains(&data.len().to_string()),
        "{:?}",
        s.message()
    );
    expect_code(
        read_digest(&mut client, &claimed.read_name()).await,
        Code::NotFound,
        "Read after short write",
    );
    expect_code(
        query(&mut client, &name).await,
        Code::NotFound,
        "QueryWriteStatus after short write",
    );
    stored.assert_intact(&mut client, "a short write").await;
    server.stop().await;
}

async fn more_bytes_than_declared_is_invalid_argument(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 50).await;

    let data = payload(2 * MIB + 10, 51);
    let declared = 2 * MIB;
    let d = digest(&data[..declared]);
    let name = write_name(&d);
    let s = expect_code(
        client.write(write_stream(&name, &data, CHUNK)).await,
        Code::InvalidArgument,
        "Write past the declared size",
    );
    assert!(
        s.message().contains(&declared.to_string()),
        "{:?}",
        s.message()
    );
    expect_code(
        read_digest(&mut client, &d.read_name()).await,
        Code::NotFound,
        "Read after overflow",
    );
    stored
        .assert_intact(&mut client, "an overflowing write")
        .await;

    // What arrived before the overflowing message is intact: finishing at the
    // declared size now commits the right blob.
    let committed = wait_for_committed(&mut client, &name, |c| c == declared as i64).await;
    let finish = WriteRequest {
        resource_name: name.clone(),
        write_offset: committed,
        finish_write: true,
        data: Bytes::new(),
    };
    let resp = {
        let mut c = server.bytestream();
        let req = finish;
        c.write(tokio_stream::iter([req])).await
    }
    .expect("finishing at the declared size");
    assert_eq!(resp.into_inner().committed_size, declared as i64);
    assert_eq!(
        read_digest(&mut client, &d.read_name())
            .await
            .expect("Read"),
        d
    );
    server.stop().await;
}

async fn size_over_max_blob_size_is_invalid_argument(kind: Kind) {
    let storage = Storage::new(kind);
    const MAX: u64 = 4 * 1024 * 1024;
    let server = TestServer::start(|c| {
        storage.configure(c);
        c.storage.max_blob_size = bytesize::ByteSize::b(MAX);
    })
    .await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 60).await;

    let data = payload(MAX as usize + 1, 61);
    let name = write_name(&digest(&data));
    let s = expect_code(
        client.write(write_stream(&name, &data, CHUNK)).await,
        Code::InvalidArgument,
        "Write over max_blob_size",
    );
    assert!(
        s.message().contains("max_blob_size"),
        "should name the setting: {:?}",
        s.message()
    );
    assert!(
        storage.partials(server.data_dir()).await.is_empty(),
        "an oversized upload created a partial"
    );
    stored
        .assert_intact(&mut client, "an oversized write")
        .await;

    // Exactly the maximum is fine.
    let data = data.slice(..MAX as usize);
    assert_eq!(
        upload(&mut client, &data)
            .await
            .expect("Write at the maximum"),
        MAX as i64
    );
    server.stop().await;
}

async fn unknown_blob_and_upload_are_not_found(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 70).await;
    let unknown = digest(b"never uploaded");

    expect_code(
        read_digest(&mut client, &unknown.read_name()).await,
        Code::NotFound,
        "Read(unknown)",
    );
    // Same hash as a stored blob, other size: a different blob.
    let other_size = Digest {
        size: stored.digest.size - 1,
        ..stored.digest
    };
    expect_code(
        read_digest(&mut client, &other_size.read_name()).await,
        Code::NotFound,
        "Read(other size)",
    );
    expect_code(
        query(&mut client, &write_name(&unknown)).await,
        Code::NotFound,
        "QueryWriteStatus(unknown)",
    );
    stored
        .assert_intact(&mut client, "reads of unknown blobs")
        .await;
    server.stop().await;
}

async fn read_offset_past_the_end_is_out_of_range(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 80).await;
    let size = stored.digest.size as i64;
    let name = stored.digest.read_name();

    for offset in [size + 1, size + 1_000_000, i64::MAX] {
        let s = expect_code(
            read(&mut client, &name, offset, 0).await,
            Code::OutOfRange,
            &format!("Read at {offset}"),
        );
        assert!(
            s.message().contains(&size.to_string()),
            "should give the size: {:?}",
            s.message()
        );
    }
    // At the end exactly: an empty read, not an error.
    assert!(
        read(&mut client, &name, size, 0)
            .await
            .expect("Read at the end")
            .is_empty()
    );
    stored
        .assert_intact(&mut client, "reads past the end")
        .await;
    server.stop().await;
}

async fn a_second_concurrent_writer_of_the_same_upload_is_aborted(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(4 * MIB + 1, 90);
    let d = digest(&data);
    let name = write_name(&d);
    let requests = write_requests(&name, &data, 0, CHUNK, true);

    let (tx, rx) = mpsc::channel::<WriteRequest>(1);
    let mut first = server.bytestream();
    let first_call = tokio::spawn(async move { first.write(ReceiverStream::new(rx)).await });
    tx.send(requests[0].clone()).await.expect("first chunk");
    let second = write_requests(&name, &data.slice(CHUNK..), CHUNK as u64, CHUNK, true);
    // Both backends report what the live stream received once it holds the
    // upload (S3 keeps it in the open multipart upload, local disk in the file).
    wait_for_committed(&mut client, &name, |c| c == CHUNK as i64).await;
    // Same upload name, on another connection, at the right offset: the first
    // stream is live, so after a bounded wait for it to end the second is refused.
    let s = expect_code(
        server.bytestream().write(tokio_stream::iter(second)).await,
        Code::Aborted,
        "second writer",
    );
    assert!(
        s.message().contains("another Write stream"),
        "{:?}",
        s.message()
    );

    for r in requests.into_iter().skip(1) {
        tx.send(r).await.expect("first writer's chunks");
    }
    let resp = first_call
        .await
        .expect("first writer task")
        .expect("first writer");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    assert_eq!(
        read_digest(&mut client, &d.read_name())
            .await
            .expect("Read"),
        d
    );
    server.stop().await;
}

/// A client that cancels a Write and resumes at once is ahead of the server,
/// which has not yet torn the old stream down: the new stream takes over, it is
/// never ABORTED because of a stream that is already gone.
async fn resume_right_after_a_cancel_is_accepted(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(4 * MIB, 91);
    let d = digest(&data);
    let name = write_name(&d);
    let requests = write_requests(&name, &data, 0, CHUNK, true);

    let (tx, rx) = mpsc::channel::<WriteRequest>(1);
    let mut writer = server.bytestream();
    let call = tokio::spawn(async move { writer.write(ReceiverStream::new(rx)).await });
    for r in requests.iter().take(2) {
        tx.send(r.clone()).await.expect("first half");
    }
    wait_for_committed(&mut client, &name, |c| c == 2 * CHUNK as i64).await;
    // The client cancels (RST_STREAM) and, without waiting, asks where to go on.
    call.abort();
    assert!(call.await.expect_err("cancelled").is_cancelled());
    let (committed, complete) = query(&mut client, &name).await.expect("QueryWriteStatus");
    assert_eq!((committed, complete), (2 * CHUNK as i64, false));
    let rest = write_requests(
        &name,
        &data.slice(committed as usize..),
        committed as u64,
        CHUNK,
        true,
    );
    let resp = server
        .bytestream()
        .write(tokio_stream::iter(rest))
        .await
        .expect("the Write resumed right after the cancel");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    assert_eq!(
        read_digest(&mut client, &d.read_name())
            .await
            .expect("Read"),
        d
    );
    drop(tx);
    server.stop().await;
}

async fn writing_an_existing_blob_succeeds_without_reading_the_rest(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 100).await;

    // Another upload of the same content sends one chunk and then nothing: the
    // server must answer at once, not wait for (or store) the rest.
    let (tx, rx) = mpsc::channel::<WriteRequest>(1);
    let name = write_name(&stored.digest);
    tx.send(write_requests(&name, &stored.data, 0, CHUNK, true)[0].clone())
        .await
        .expect("first chunk");
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client.write(ReceiverStream::new(rx)),
    )
    .await
    .expect("the server waited for the rest of an existing blob")
    .expect("Write of an existing blob");
    assert_eq!(resp.into_inner().committed_size, stored.digest.size as i64);
    drop(tx);
    assert_eq!(
        query(&mut client, &name).await.expect("QueryWriteStatus"),
        (stored.digest.size as i64, true)
    );
    assert!(
        storage.partials(server.data_dir()).await.is_empty(),
        "a duplicate upload created a partial"
    );
    stored
        .assert_intact(&mut client, "a duplicate upload")
        .await;
    server.stop().await;
}

async fn resource_name_changing_mid_stream_is_invalid_argument(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 110).await;

    let data = payload(3 * MIB, 111);
    let d = digest(&data);
    let name = write_name(&d);
    let mut reqs = write_requests(&name, &data, 0, CHUNK, true);
    reqs[1].resource_name = write_name(&d); // another upload id
    let s = expect_code(
        client.write(tokio_stream::iter(reqs)).await,
        Code::InvalidArgument,
        "resource_name change",
    );
    assert!(
        s.message().contains("changed mid-stream"),
        "{:?}",
        s.message()
    );
    expect_code(
        read_digest(&mut client, &d.read_name()).await,
        Code::NotFound,
        "Read after a refused write",
    );
    stored.assert_intact(&mut client, "a renamed stream").await;

    // Repeating the same name in every message is allowed.
    let again = write_name(&d);
    let mut fresh = write_requests(&again, &data, 0, CHUNK, true);
    for r in &mut fresh {
        r.resource_name = again.clone();
    }
    let resp = client
        .write(tokio_stream::iter(fresh))
        .await
        .expect("same name in every message");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_the_per_message_cap_is_refused_and_the_server_keeps_working() {
    let server = TestServer::start(|_| {}).await;
    let channel = server.channel();
    let mut client = bytestream(channel.clone());
    let stored = Stored::put(&mut client, 120).await;
    let cap = memgate::api::bytestream::MAX_STREAM_MESSAGE;

    // As the first message.
    let data = payload(cap + 1, 121);
    let d = digest(&data);
    let s = expect_code(
        client
            .write(write_stream(&write_name(&d), &data, cap + 1))
            .await,
        Code::OutOfRange,
        "first message over the cap",
    );
    assert!(
        s.message().contains(&cap.to_string()),
        "should give the limit: {:?}",
        s.message()
    );
    stored
        .assert_intact(&mut client, "an oversized first message")
        .await;

    // After a normal one: what came before is kept and can be resumed.
    let name = write_name(&d);
    let mut reqs = write_requests(&name, &data.slice(..CHUNK), 0, CHUNK, false);
    reqs.push(WriteRequest {
        resource_name: String::new(),
        write_offset: CHUNK as i64,
        finish_write: true,
        data: data.slice(CHUNK..),
    });
    reqs[1].data = Bytes::from(vec![7u8; cap + 10]);
    reqs[1].finish_write = false;
    expect_code(
        client.write(tokio_stream::iter(reqs)).await,
        Code::OutOfRange,
        "second message over the cap",
    );
    stored
        .assert_intact(&mut client, "an oversized second message")
        .await;
    // What came before the oversized message was kept.
    wait_for_committed(&mut client, &name, |c| c == CHUNK as i64).await;
    let rest = write_requests(&name, &data.slice(CHUNK..), CHUNK as u64, CHUNK, true);
    let resp = {
        let mut c = bytestream(channel.clone());
        let reqs = rest;
        c.write(tokio_stream::iter(reqs)).await
    }
    .expect("resume after the oversized message");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    assert_eq!(
        read_digest(&mut client, &d.read_name())
            .await
            .expect("Read"),
        d
    );
    server.stop().await;
}

/// The `.part` file of the upload with id `uuid`.
fn partial_of(dir: &Path, uuid: &str) -> std::path::PathBuf {
    let found: Vec<_> = partials(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(uuid))
        })
        .collect();
    assert_eq!(found.len(), 1, "partials of {uuid}: {found:?}");
    found.into_iter().next().expect("one")
}

fn age(path: &Path, by: Duration) {
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open partial");
    file.set_modified(std::time::SystemTime::now() - by)
        .expect("set mtime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_removes_expired_partials_but_not_active_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(&StorageConfig {
        data_dir: dir.path().to_path_buf(),
        ..StorageConfig::default()
    })
    .expect("open store");
    let expiry = Duration::from_secs(3600);
    let old_age = Duration::from_secs(2 * 3600);

    let make = |prefix: &str, seed: u64| {
        let id = format!("{prefix}-{}", uuid::Uuid::new_v4());
        let data = payload(MIB + seed as usize, seed);
        let name = parse_write_name(&write_name_with(&id, &digest(&data))).expect("valid name");
        (id, name, data)
    };
    let (old_id, old, old_data) = make("old", 130);
    let (_, fresh, fresh_data) = make("fresh", 131);
    let (active_id, active, active_data) = make("active", 132);

    for (name, data) in [(&old, &old_data), (&fresh, &fresh_data)] {
        let mut up = store.begin_write(name, 0).await.expect("begin");
        up.write(data.slice(..1000)).await.expect("write");
        assert_eq!(up.suspend().await.expect("suspend"), 1000);
    }
    let mut writing = store.begin_write(&active, 0).await.expect("begin active");
    age(&partial_of(dir.path(), &old_id), old_age);
    age(&partial_of(dir.path(), &active_id), old_age);

    assert_eq!(store.collect_garbage(expiry).await.expect("gc"), 1);
    assert!(matches!(
        store.query_write_status(&old).await,
        Err(StoreError::UploadNotFound(_))
    ));
    assert_eq!(
        store.query_write_status(&fresh).await.expect("fresh kept"),
        (1000, false)
    );
    assert_eq!(
        store
            .query_write_status(&active)
            .await
            .expect("active kept"),
        (0, false)
    );

    // The active upload still completes.
    writing
        .write(active_data.clone())
        .await
        .expect("write active");
    assert_eq!(
        writing.finish().await.expect("finish active"),
        active_data.len() as u64
    );
    assert_eq!(
        store.query_write_status(&active).await.expect("committed"),
        (active_data.len() as u64, true)
    );

    // Once nobody writes it, an old partial goes too: activity was what kept it.
    age(&partial_of(dir.path(), &fresh.uuid), old_age);
    assert_eq!(store.collect_garbage(expiry).await.expect("gc"), 1);
    assert!(partials(dir.path()).is_empty());
}

async fn empty_blob_round_trip(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let d = digest(b"");
    assert_eq!(d.hex(), H);
    let name = write_name(&d);
    let resp = client
        .write(write_stream(&name, &Bytes::new(), CHUNK))
        .await
        .expect("empty Write");
    assert_eq!(resp.into_inner().committed_size, 0);
    assert_eq!(
        query(&mut client, &name).await.expect("QueryWriteStatus"),
        (0, true)
    );
    assert!(
        read(&mut client, &d.read_name(), 0, 0)
            .await
            .expect("Read")
            .is_empty()
    );
    expect_code(
        read(&mut client, &d.read_name(), 1, 0).await,
        Code::OutOfRange,
        "Read past an empty blob",
    );
    server.stop().await;
}

async fn write_stream_without_messages_is_invalid_argument(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 140).await;
    let s = expect_code(
        client
            .write(tokio_stream::iter(Vec::<WriteRequest>::new()))
            .await,
        Code::InvalidArgument,
        "empty Write stream",
    );
    assert!(s.message().contains("first message"), "{:?}", s.message());
    stored
        .assert_intact(&mut client, "an empty Write stream")
        .await;
    server.stop().await;
}

// A Write refused for its offset must not create an (empty) partial upload.
async fn a_write_refused_for_its_offset_leaves_nothing_behind(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 150).await;
    let data = payload(MIB, 151);
    let d = digest(&data);
    let name = write_name(&d);
    let s = expect_code(
        client
            .write(tokio_stream::iter(write_requests(
                &name,
                &data.slice(10..),
                10,
                CHUNK,
                true,
            )))
            .await,
        Code::InvalidArgument,
        "first Write of a new upload at offset 10",
    );
    assert!(s.message().contains("expected 0"), "{:?}", s.message());
    stored
        .assert_intact(&mut client, "a Write at a wrong offset")
        .await;
    expect_code(
        query(&mut client, &name).await,
        Code::NotFound,
        "QueryWriteStatus of a refused upload",
    );
    assert!(
        storage.partials(server.data_dir()).await.is_empty(),
        "left behind: {:?}",
        storage.partials(server.data_dir()).await
    );
    server.stop().await;
}

/// Runs each test above against local disk and against S3 (a real Garage).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Local).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::S3).await
                }
            )*
        }
    };
}

on_both_backends!(
    round_trip_of_a_150mb_blob,
    upload_resumes_after_the_client_disconnects,
    half_closed_write_reports_what_was_committed_and_resumes,
    upload_resumes_after_a_server_restart,
    malformed_names_are_invalid_argument,
    negative_offsets_and_limits_are_refused,
    wrong_digest_on_finish_stores_nothing,
    fewer_bytes_than_declared_at_finish_is_invalid_argument,
    more_bytes_than_declared_is_invalid_argument,
    size_over_max_blob_size_is_invalid_argument,
    unknown_blob_and_upload_are_not_found,
    read_offset_past_the_end_is_out_of_range,
    a_second_concurrent_writer_of_the_same_upload_is_aborted,
    resume_right_after_a_cancel_is_accepted,
    writing_an_existing_blob_succeeds_without_reading_the_rest,
    resource_name_changing_mid_stream_is_invalid_argument,
    empty_blob_round_trip,
    write_stream_without_messages_is_invalid_argument,
    a_write_refused_for_its_offset_leaves_nothing_behind,
);
