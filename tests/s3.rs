//! What only the S3 backend has to prove, against a real Garage: replicas share
//! one bucket (a blob or a half-finished upload written through one is read or
//! finished through another), an object store that goes away mid-upload costs
//! the client a clear UNAVAILABLE and nothing else (memgate stays live, readiness
//! says why it is not ready, uploads work again once the store is back), and
//! refused credentials are PERMISSION_DENIED without leaking them. The
//! request-level suite shared with the local store is in tests/bytestream.rs.

mod support;
mod support_s3;

use std::time::{Duration, Instant};

use bytes::Bytes;
use memgate::proto::bytestream::WriteRequest;
use support::{process::Memgate, *};
use support_s3::{BUCKET, Garage, Kind, Storage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const MIB: usize = 1 << 20;
const PREFIX: &str = "shared/";

/// A memgate config for `garage`, credentials left to the environment.
fn s3_config(garage: &Garage) -> String {
    format!(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = \"{}\"\nregion = \"garage\"\n\
         bucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\npath_style = true\n\
         connect_timeout = \"1s\"\nmax_retries = 2\nretry_timeout = \"3s\"\n\
         health_interval = \"200ms\"\n",
        garage.endpoint()
    )
}

fn start(garage: &Garage) -> Memgate {
    Memgate::start_with(
        tempfile::tempdir().expect("tempdir"),
        &s3_config(garage),
        &[
            ("AWS_ACCESS_KEY_ID", &garage.key_id),
            ("AWS_SECRET_ACCESS_KEY", &garage.secret),
        ],
    )
}

/// Polls `/readyz` (bounded) until `ready` holds; returns the body.
async fn wait_readyz(m: &Memgate, ready: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = m.http("/readyz").await;
        if (code == 200) == ready {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never became {ready}: {code} {body}\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client(
    m: &Memgate,
) -> memgate::proto::bytestream::byte_stream_client::ByteStreamClient<tonic::transport::Channel> {
    bytestream(
        tonic::transport::Endpoint::from_shared(m.grpc.clone())
            .expect("url")
            .connect_lazy(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_bucket() {
    let garage = Garage::start();
    let (a, b) = (start(&garage), start(&garage));
    wait_readyz(&a, true).await;
    wait_readyz(&b, true).await;
    let (mut ca, mut cb) = (client(&a), client(&b));

    // A blob written through one replica reads back through the other.
    let data = payload(20 * MIB + 3, 1);
    let d = digest(&data);
    assert_eq!(
        upload(&mut ca, &data).await.expect("upload via a"),
        data.len() as i64
    );
    assert_eq!(
        read_digest(&mut cb, &d.read_name())
            .await
            .expect("read via b"),
        d
    );
    let slice = read(&mut cb, &d.read_name(), 5 * MIB as i64, 1000)
        .await
        .expect("ranged read via b");
    assert!(slice == data[5 * MIB..5 * MIB + 1000]);

    // An upload paused on one replica is seen by the other and finished there.
    let data = payload(9 * MIB + 7, 2);
    let d = digest(&data);
    let name = write_name(&d);
    let head = data.slice(..6 * MIB);
    let paused = ca
        .write(tokio_stream::iter(write_requests(
            &name, &head, 0, MIB, false,
        )))
        .await
        .expect("paused Write via a");
    assert_eq!(paused.into_inner().committed_size, head.len() as i64);
    assert_eq!(
        query(&mut cb, &name).await.expect("QueryWriteStatus via b"),
        (head.len() as i64, false)
    );
    let rest = data.slice(head.len()..);
    let done = cb
        .write(tokio_stream::iter(write_requests(
            &name,
            &rest,
            head.len() as u64,
            MIB,
            true,
        )))
        .await
        .expect("finishing Write via b");
    assert_eq!(done.into_inner().committed_size, data.len() as i64);
    assert_eq!(
        read_digest(&mut ca, &d.read_name())
            .await
            .expect("read via a"),
        d
    );
    let keys = garage.list(PREFIX).await;
    assert!(
        keys.iter()
            .all(|(k, _)| k.starts_with(&format!("{PREFIX}blobs/"))),
        "only blobs stay once uploads finish: {keys:?}"
    );

    // Each replica counts its own requests to the store, by operation and outcome.
    assert_eq!(
        a.metric("memgate_storage_backend", &[("backend", "s3")])
            .await,
        1.0
    );
    let ok_parts = a
        .metric(
            "memgate_object_store_requests_total",
            &[("op", "put_part"), ("outcome", "ok")],
        )
        .await;
    assert!(ok_parts >= 3.0, "put_part ok = {ok_parts}");
    let completes = b
        .metric(
            "memgate_object_store_requests_total",
            &[("op", "complete_multipart"), ("outcome", "ok")],
        )
        .await;
    assert!(
        completes >= 1.0,
        "b completed the resumed upload: {completes}"
    );
    let timed = a
        .metric(
            "memgate_object_store_request_duration_seconds_count",
            &[("op", "put_part")],
        )
        .await;
    assert_eq!(timed, ok_parts, "every put_part is timed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_outage_mid_upload_is_unavailable_and_recoverable() {
    let mut garage = Garage::start();
    let m = start(&garage);
    wait_readyz(&m, true).await;
    let mut c = client(&m);
    let before = payload(3 * MIB, 10);
    upload(&mut c, &before)
        .await
        .expect("upload before the outage");

    // A 64 MiB upload, fed by hand; the store dies after 16 MiB.
    let data = payload(64 * MIB, 11);
    let d = digest(&data);
    let name = write_name(&d);
    let (tx, rx) = mpsc::channel::<WriteRequest>(2);
    let mut writer = client(&m);
    let call = tokio::spawn(async move { writer.write(ReceiverStream::new(rx)).await });
    let mut requests = write_requests(&name, &data, 0, MIB, true).into_iter();
    for r in requests.by_ref().take(16) {
        tx.send(r).await.expect("first 16 MiB");
    }
    garage.stop();
    // The rest, for as long as the server takes it; it stops taking it once the
    // upload failed.
    for r in requests {
        if tx.send(r).await.is_err() {
            break;
        }
    }
    drop(tx);
    let status = call
        .await
        .expect("writer task")
        .expect_err("an upload into a dead store cannot succeed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("object store unavailable"),
        "{status:?}"
    );

    // memgate is live, and says why it is not ready.
    let (live, _) = m.http("/livez").await;
    assert_eq!(live, 200);
    let why = wait_readyz(&m, false).await;
    assert!(why.contains("storage unavailable"), "/readyz said {why:?}");
    // Reads fail the same way, without hanging.
    let s = expect_code(
        read_digest(&mut c, &digest(&before).read_name()).await,
        Code::Unavailable,
        "Read during the outage",
    );
    assert!(!s.message().is_empty());

    garage.restart();
    wait_readyz(&m, true).await;
    // Nothing of the failed upload is visible under its content address.
    let keys = garage.list(PREFIX).await;
    let blob = format!("{PREFIX}blobs/{}", d.hex());
    assert!(
        !keys.iter().any(|(k, _)| *k == blob),
        "half-written blob: {keys:?}"
    );
    expect_code(
        read_digest(&mut c, &d.read_name()).await,
        Code::NotFound,
        "Read of the failed upload",
    );
    // What was stored before the outage is intact, and uploads work again.
    assert_eq!(
        read_digest(&mut c, &digest(&before).read_name())
            .await
            .expect("old blob"),
        digest(&before)
    );
    let committed = retry_aborted(|| {
        let mut c = client(&m);
        let reqs = write_requests(&name, &data, 0, MIB, true);
        async move { c.write(tokio_stream::iter(reqs)).await }
    })
    .await
    .expect("the same upload after the store is back");
    assert_eq!(committed.into_inner().committed_size, data.len() as i64);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.expect("Read"), d);
    let unavailable = m
        .metric(
            "memgate_object_store_requests_total",
            &[("outcome", "unavailable")],
        )
        .await;
    assert!(unavailable >= 1.0, "outage requests counted: {unavailable}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_permission_denied_without_leaking_them() {
    let mut storage = Storage::new(Kind::S3);
    let secret = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let creds = {
        let g = storage.garage();
        let path = g.credentials_file().with_file_name("wrong-credentials");
        std::fs::write(
            &path,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
                g.key_id
            ),
        )
        .expect("credentials");
        path
    };
    let server = TestServer::start(|c| {
        storage.configure(c);
        c.storage.s3.credentials_file = creds;
    })
    .await;
    let mut client = server.bytestream();
    let data = Bytes::from(vec![7u8; MIB]);
    let s = expect_code(
        upload(&mut client, &data).await,
        Code::PermissionDenied,
        "Write with a wrong secret",
    );
    let key_id = storage.garage().key_id.clone();
    for leaked in [secret, key_id.as_str()] {
        assert!(
            !s.message().contains(leaked),
            "status leaks credentials: {s:?}"
        );
    }
    assert!(s.message().contains("credentials"), "{s:?}");
    assert!(storage.garage().list("").await.is_empty(), "nothing stored");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_removes_expired_staging_objects_but_not_active_uploads() {
    use memgate::{
        api::resource::parse_write_name,
        config::{Backend, StorageConfig},
        store::{BlobStore, S3Store, StoreError},
    };
    let garage = Garage::start();
    let cfg = StorageConfig {
        backend: Backend::S3,
        s3: garage.s3_config("gc/"),
        ..StorageConfig::default()
    };
    let store = S3Store::open(&cfg, std::sync::Arc::new(())).expect("open");
    let name = |seed| {
        let data = payload(MIB + seed as usize, seed);
        let name = parse_write_name(&write_name(&digest(&data))).expect("valid name");
        (name, data)
    };
    let (paused, paused_data) = name(1);
    let (active, active_data) = name(2);
    for (name, data) in [(&paused, &paused_data), (&active, &active_data)] {
        let mut up = store.begin_write(name, 0).await.expect("begin");
        up.write(data.slice(..1000)).await.expect("write");
        assert_eq!(up.suspend().await.expect("suspend"), 1000);
    }

    // Age is what expires an upload: a long expiry keeps both.
    assert_eq!(
        store
            .collect_garbage(Duration::from_secs(3600))
            .await
            .expect("gc"),
        0
    );
    // Both staging objects are older than 50 ms once 60 ms have passed (wall-clock
    // age is the behaviour under test). One upload is being resumed meanwhile:
    // its old staging object is in use and must stay.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let mut writing = store
        .begin_write(&active, 1000)
        .await
        .expect("resume active");
    assert_eq!(
        store
            .collect_garbage(Duration::from_millis(50))
            .await
            .expect("gc"),
        1
    );
    assert!(matches!(
        store.query_write_status(&paused).await,
        Err(StoreError::UploadNotFound(_))
    ));
    assert_eq!(
        store.query_write_status(&active).await.expect("kept"),
        (1000, false)
    );
    writing
        .write(active_data.slice(1000..))
        .await
        .expect("rest");
    assert_eq!(
        writing.finish().await.expect("finish"),
        active_data.len() as u64
    );
    assert_eq!(
        store.query_write_status(&active).await.expect("committed"),
        (active_data.len() as u64, true)
    );
    let keys = garage.list("gc/").await;
    assert_eq!(keys.len(), 1, "only the finished blob: {keys:?}");
}
