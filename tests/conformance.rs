//! ByteStream as google/bytestream/bytestream.proto and the Remote Execution
//! API (remote_execution.proto, the ContentAddressableStorage comment) specify
//! it, rule by rule, on both backends (local disk and a real Garage), with a
//! real in-process server and a real tonic client. docs/bytestream.md maps each
//! rule to its test here or in tests/bytestream.rs.

mod support;
mod support_s3;

use std::time::Duration;

use bytes::Bytes;
use memgate::{
    api::resource::Digest,
    proto::bytestream::{WriteRequest, byte_stream_client::ByteStreamClient},
};
use support::*;
use support_s3::{Kind, Storage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};

const MIB: usize = 1 << 20;

/// A Write fed message by message from a channel the test holds.
fn open_write(
    client: &ByteStreamClient<Channel>,
) -> (
    mpsc::Sender<WriteRequest>,
    tokio::task::JoinHandle<Result<i64, tonic::Status>>,
) {
    let (tx, rx) = mpsc::channel(8);
    let mut client = client.clone();
    let call = tokio::spawn(async move {
        client
            .write(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().committed_size)
    });
    (tx, call)
}

/// The answer of a Write, waited for with a generous bound (not a timing check).
async fn answer(
    call: tokio::task::JoinHandle<Result<i64, tonic::Status>>,
) -> Result<i64, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the Write was answered")
        .expect("the Write task")
}

/// Write: "Sending any `WriteRequest`s subsequent to one in which
/// `finish_write` is `true` will cause an error."
async fn a_request_after_finish_write_is_invalid_argument_and_the_blob_stays(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(3 * MIB + 17, 1);
    let d = digest(&data);
    let name = write_name(&d);
    let mut reqs = write_requests(&name, &data, 0, MIB, true);
    // One more message after the finishing one, in the same stream.
    reqs.push(WriteRequest {
        resource_name: String::new(),
        write_offset: data.len() as i64,
        finish_write: false,
        data: Bytes::from_static(b"late"),
    });
    let s = expect_code(
        client.write(tokio_stream::iter(reqs)).await,
        Code::InvalidArgument,
        "a WriteRequest after finish_write",
    );
    assert!(
        s.message().contains("followed the one with finish_write"),
        "{}",
        s.message()
    );
    // The commit stands, with exactly the declared bytes.
    assert_eq!(read_digest(&mut client, &d.read_name()).await.unwrap(), d);
    assert_eq!(
        query(&mut client, &name).await.unwrap(),
        (d.size as i64, true)
    );

    // Sent a moment later on a stream still open: the same.
    let other = payload(MIB, 2);
    let od = digest(&other);
    let oname = write_name(&od);
    let (tx, call) = open_write(&client);
    for r in write_requests(&oname, &other, 0, MIB, true) {
        tx.send(r).await.unwrap();
    }
    // Straight after the finishing message, on the stream still open.
    let _ = tx
        .send(WriteRequest {
            resource_name: oname.clone(),
            write_offset: 0,
            finish_write: true,
            data: other.clone(),
        })
        .await;
    expect_code(
        answer(call).await,
        Code::InvalidArgument,
        "a second finish_write",
    );
    assert_eq!(read_digest(&mut client, &od.read_name()).await.unwrap(), od);
    server.stop().await;
}

/// The same rule must not hang a client that sends `finish_write` and waits for
/// the response before half-closing: it is answered after a bounded wait
/// (`api::bytestream::AFTER_FINISH_WAIT`).
async fn finish_write_without_half_close_is_answered(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(2 * MIB, 3);
    let d = digest(&data);
    let name = write_name(&d);
    let (tx, call) = open_write(&client);
    for r in write_requests(&name, &data, 0, MIB, true) {
        tx.send(r).await.unwrap();
    }
    // The sender stays open until the answer is in.
    assert_eq!(
        answer(call).await.expect("OK without a half-close"),
        d.size as i64
    );
    drop(tx);
    assert_eq!(read_digest(&mut client, &d.read_name()).await.unwrap(), d);
    server.stop().await;
}

/// WriteRequest.write_offset: "On subsequent calls, this value **must** be set
/// and **must** be equal to the sum of the first `write_offset` and the sizes
/// of all `data` bundles sent previously on this stream. An incorrect value
/// will cause an error." What arrived before the bad message stays committed.
async fn a_later_write_offset_that_skips_ahead_is_refused_and_keeps_what_arrived(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(4 * MIB, 4);
    let d = digest(&data);
    let name = write_name(&d);
    let mut reqs = write_requests(&name, &data, 0, MIB, true);
    reqs[2].write_offset += 1;
    let s = expect_code(
        client.write(tokio_stream::iter(reqs)).await,
        Code::InvalidArgument,
        "a write_offset one past the expected",
    );
    assert!(
        s.message().contains(&format!("expected {}", 2 * MIB)),
        "{}",
        s.message()
    );
    // Resume from what QueryWriteStatus reports (nothing yet, NOT_FOUND, is 0),
    // retrying while the cut stream is still making its bytes durable.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let committed = match query(&mut client, &name).await {
            Ok((c, _)) => c,
            Err(s) if s.code() == Code::NotFound => 0,
            Err(s) => panic!("QueryWriteStatus: {s:?}"),
        };
        assert!(committed <= 2 * MIB as i64, "{committed}");
        let rest = data.slice(committed as usize..);
        let reqs = write_requests(&name, &rest, committed as u64, MIB, true);
        match client.write(tokio_stream::iter(reqs)).await {
            Ok(r) => {
                assert_eq!(r.into_inner().committed_size, d.size as i64);
                break;
            }
            Err(s)
                if matches!(s.code(), Code::Aborted | Code::InvalidArgument)
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("resume: {s:?}"),
        }
    }
    assert_eq!(read_digest(&mut client, &d.read_name()).await.unwrap(), d);
    server.stop().await;
}

/// WriteRequest.resource_name: "This **must** be set on the first
/// `WriteRequest` of each `Write()` action."
async fn a_first_request_without_resource_name_is_invalid_argument(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(MIB, 5);
    let mut reqs = write_requests(&write_name(&digest(&data)), &data, 0, MIB, true);
    reqs[0].resource_name.clear();
    let s = expect_code(
        client.write(tokio_stream::iter(reqs)).await,
        Code::InvalidArgument,
        "no resource_name on the first message",
    );
    assert!(s.message().contains("empty"), "{}", s.message());
    assert!(storage.partials(server.data_dir()).await.is_empty());
    server.stop().await;
}

/// WriteRequest.data: "The client **may** leave `data` empty for any given
/// `WriteRequest`" (to show the request is still live).
async fn empty_data_messages_are_accepted_anywhere(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(3 * MIB, 6);
    let d = digest(&data);
    let name = write_name(&d);
    let mut reqs = Vec::new();
    for r in write_requests(&name, &data, 0, MIB, true) {
        let keepalive = WriteRequest {
            resource_name: String::new(),
            write_offset: r.write_offset,
            finish_write: false,
            data: Bytes::new(),
        };
        // Empty before the first chunk too: the first message may carry no data.
        if r.write_offset == 0 {
            reqs.push(WriteRequest {
                resource_name: name.clone(),
                ..keepalive.clone()
            });
        } else {
            reqs.push(keepalive);
        }
        reqs.push(WriteRequest {
            resource_name: String::new(),
            ..r
        });
    }
    let resp = client
        .write(tokio_stream::iter(reqs))
        .await
        .expect("Write with empty messages");
    assert_eq!(resp.into_inner().committed_size, d.size as i64);
    assert_eq!(read_digest(&mut client, &d.read_name()).await.unwrap(), d);
    server.stop().await;
}

/// QueryWriteStatus: "For any sequence of `QueryWriteStatus()` calls for a
/// given resource name, the sequence of returned `committed_size` values will
/// be non-decreasing"; `complete` only once `finish_write` was processed.
async fn query_write_status_never_goes_backwards_and_completes_on_finish(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(48 * MIB, 7);
    let d = digest(&data);
    let name = write_name(&d);
    let (tx, call) = open_write(&client);
    let reqs = write_requests(&name, &data, 0, MIB, true);
    let feeder = tokio::spawn(async move {
        for r in reqs {
            if tx.send(r).await.is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "never complete: {seen:?}"
        );
        match query(&mut client, &name).await {
            Ok((committed, complete)) => {
                seen.push(committed);
                if complete {
                    assert_eq!(committed, d.size as i64);
                    break;
                }
            }
            // Before the first message reached the server.
            Err(s) if s.code() == Code::NotFound && seen.is_empty() => {}
            Err(s) => panic!("QueryWriteStatus: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "went backwards: {seen:?}"
    );
    assert_eq!(*seen.last().unwrap(), d.size as i64);
    assert_eq!(answer(call).await.unwrap(), d.size as i64);
    feeder.await.unwrap();

    // Half-closed without finish_write: answered, not complete.
    let other = payload(2 * MIB, 8);
    let oname = write_name(&digest(&other));
    let resp = client
        .write(tokio_stream::iter(write_requests(
            &oname, &other, 0, MIB, false,
        )))
        .await
        .expect("half-close");
    assert_eq!(resp.into_inner().committed_size, other.len() as i64);
    assert_eq!(
        query(&mut client, &oname).await.unwrap(),
        (other.len() as i64, false)
    );
    server.stop().await;
}

/// ReadRequest.read_limit: "A `read_limit` of zero indicates that there is no
/// limit ... If the stream returns fewer bytes than allowed by the `read_limit`
/// and no error occurred, the stream includes all data from the `read_offset`
/// to the end of the resource."
async fn read_limit_zero_is_unlimited_and_a_short_read_is_the_whole_rest(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 9).await;
    let name = stored.digest.read_name();
    let size = stored.data.len() as i64;
    for (offset, limit, want) in [
        (0, 0, 0..size),
        (100, 0, 100..size),
        (100, 1000, 100..1100),
        (size - 10, 1000, size - 10..size),
        (size - 10, 10, size - 10..size),
        (size, 5, size..size),
    ] {
        let got = read(&mut client, &name, offset, limit).await.unwrap();
        assert_eq!(
            got,
            stored.data[want.start as usize..want.end as usize],
            "Read({offset}, {limit})"
        );
    }
    server.stop().await;
}

/// REAPI: "Servers MUST behave as though empty blobs are always available,
/// even if they have not been uploaded."
async fn the_empty_blob_is_always_available(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let name = Digest::EMPTY.read_name();
    assert!(
        read(&mut client, &name, 0, 0)
            .await
            .expect("never uploaded")
            .is_empty()
    );
    expect_code(
        read(&mut client, &name, 1, 0).await,
        Code::OutOfRange,
        "past its end",
    );
    let wname = write_name(&Digest::EMPTY);
    assert_eq!(query(&mut client, &wname).await.unwrap(), (0, true));
    let resp = client
        .write(write_stream(&wname, &Bytes::new(), MIB))
        .await
        .expect("writing it");
    assert_eq!(resp.into_inner().committed_size, 0);
    // A zero-size name with another hash is not the empty blob.
    let other = format!("blobs/{}/0", "ab".repeat(32));
    expect_code(
        read(&mut client, &other, 0, 0).await,
        Code::NotFound,
        "another hash, size 0",
    );
    server.stop().await;
}

/// REAPI write names: `{instance_name}/uploads/{uuid}/blobs/{hash}/{size}{/optional_metadata}`:
/// "`optional_metadata` is implementation specific data, which clients MAY
/// omit. Servers MAY ignore this metadata."
async fn write_names_may_carry_optional_metadata(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let data = payload(2 * MIB, 10);
    let d = digest(&data);
    let name = format!("{}/client-meta/v1", write_name(&d));
    let resp = client
        .write(write_stream(&name, &data, MIB))
        .await
        .expect("a name with metadata");
    assert_eq!(resp.into_inner().committed_size, d.size as i64);
    assert_eq!(read_digest(&mut client, &d.read_name()).await.unwrap(), d);
    assert_eq!(
        query(&mut client, &name).await.unwrap(),
        (d.size as i64, true)
    );
    server.stop().await;
}

/// REAPI: a `digest_function` segment is omitted for SHA-256 and names another
/// function otherwise; `compressed-blobs` need a compressor the server
/// advertises. memgate has neither, and says so.
async fn other_digest_functions_and_compressed_blobs_are_named_as_unsupported(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let mut client = server.bytestream();
    let stored = Stored::put(&mut client, 11).await;
    let h = stored.digest.hex();
    for (name, wanted) in [
        (format!("blobs/blake3/{h}/5"), "digest function \"blake3\""),
        (format!("compressed-blobs/zstd/{h}/5"), "compressed-blobs"),
    ] {
        let s = expect_code(
            read(&mut client, &name, 0, 0).await,
            Code::InvalidArgument,
            &name,
        );
        assert!(s.message().contains(wanted), "{}", s.message());
        let wname = format!("uploads/u1/{name}");
        let s = expect_code(
            client
                .write(write_stream(&wname, &Bytes::from_static(b"hello"), MIB))
                .await,
            Code::InvalidArgument,
            &wname,
        );
        assert!(s.message().contains(wanted), "{}", s.message());
    }
    stored.assert_intact(&mut client, "unsupported names").await;
    server.stop().await;
}

/// REAPI: "Uploads of the same data MAY occur concurrently", each under its
/// own uuid; both succeed and the blob is the one content.
async fn concurrent_uploads_of_the_same_blob_under_two_uuids_both_succeed(kind: Kind) {
    let storage = Storage::new(kind);
    let server = TestServer::start(|c| storage.configure(c)).await;
    let client = server.bytestream();
    let data = payload(24 * MIB, 12);
    let d = digest(&data);
    let (a_tx, a) = open_write(&client);
    let (b_tx, b) = open_write(&client);
    let (na, nb) = (write_name(&d), write_name(&d));
    // Interleaved, so both are in progress at once.
    for (ra, rb) in write_requests(&na, &data, 0, MIB, true)
        .into_iter()
        .zip(write_requests(&nb, &data, 0, MIB, true))
    {
        a_tx.send(ra).await.unwrap();
        b_tx.send(rb).await.unwrap();
    }
    drop((a_tx, b_tx));
    assert_eq!(answer(a).await.unwrap(), d.size as i64);
    assert_eq!(answer(b).await.unwrap(), d.size as i64);
    assert_eq!(
        read_digest(&mut client.clone(), &d.read_name())
            .await
            .unwrap(),
        d
    );
    server.stop().await;
}

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
    a_request_after_finish_write_is_invalid_argument_and_the_blob_stays,
    finish_write_without_half_close_is_answered,
    a_later_write_offset_that_skips_ahead_is_refused_and_keeps_what_arrived,
    a_first_request_without_resource_name_is_invalid_argument,
    empty_data_messages_are_accepted_anywhere,
    query_write_status_never_goes_backwards_and_completes_on_finish,
    read_limit_zero_is_unlimited_and_a_short_read_is_the_whole_rest,
    the_empty_blob_is_always_available,
    write_names_may_carry_optional_metadata,
    other_digest_functions_and_compressed_blobs_are_named_as_unsupported,
    concurrent_uploads_of_the_same_blob_under_two_uuids_both_succeed,
);
