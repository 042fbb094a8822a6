//! What only the S3 backend has to prove, against a real Garage: replicas share
//! one bucket (a blob or a half-finished upload written through one is read or
//! finished through another), an object store that goes away mid-upload costs
//! the client a clear UNAVAILABLE and nothing else (memgate stays live, readiness
//! says why it is not ready, uploads work again once the store is back), and
//! refused credentials are PERMISSION_DENIED without leaking them. The
//! request-level suite shared with the local store is in tests/bytestream.rs.

mod support;
mod support_s3;

use std::time::Duration;

use bytes::Bytes;
use memgate::store::BlobStore;
use support::{process::Memgate, *};
use support_s3::{
    BUCKET, Garage, Kind, Storage,
    replica::{self, Feed, MIB, PART, client, replica, resume, wait_readyz},
};
use tonic::Code;

const PREFIX: &str = "shared/";

/// A memgate replica on `garage`, keys under [`PREFIX`].
fn start(garage: &Garage) -> Memgate {
    replica(garage.access(), &garage.endpoint(), PREFIX)
}

async fn assert_only_blobs(garage: &Garage) {
    replica::assert_only_blobs(garage.access(), &garage.endpoint(), PREFIX).await;
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

/// Issue 17: the store killed (SIGKILL) mid-upload after at least 16 MiB were
/// acknowledged. The Write ends UNAVAILABLE; while the store is down
/// QueryWriteStatus is UNAVAILABLE too (not NOT_FOUND); once it is back, the
/// other replica reports what the store acknowledged, a wrong offset is refused
/// naming it, the Write resumed from it completes and the blob reads back.
/// Nothing half-written ever sits under the content address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_outage_mid_upload_keeps_what_it_acknowledged() {
    let mut garage = Garage::start();
    let (a, b) = (start(&garage), start(&garage));
    wait_readyz(&a, true).await;
    wait_readyz(&b, true).await;
    let (mut ca, mut cb) = (client(&a), client(&b));
    let before = payload(3 * MIB, 10);
    upload(&mut ca, &before)
        .await
        .expect("upload before the outage");

    // A 64 MiB upload through a, fed by hand; the store dies once two parts
    // (16 MiB) are acknowledged.
    let data = payload(64 * MIB, 11);
    let d = digest(&data);
    let name = write_name(&d);
    let mut feed = Feed::start(&a, &name, &data);
    feed.send(24 * MIB).await;
    // The other replica sees what the store acknowledged, stream or no stream.
    wait_for_committed(&mut cb, &name, |c| c >= 16 * MIB as i64).await;
    garage.stop();
    // The rest, for as long as the server takes it; it stops taking it once the
    // upload failed.
    let sent = feed.send_rest().await;
    let status = feed
        .result()
        .await
        .expect_err("an upload into a dead store cannot succeed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("object store unavailable")
            && status.message().contains("QueryWriteStatus"),
        "{status:?}"
    );

    // memgate is live, and says why it is not ready. Asking where the upload
    // stands is UNAVAILABLE, on either replica: the answer is in the store.
    let (live, _) = a.http("/livez").await;
    assert_eq!(live, 200);
    for m in [&a, &b] {
        let why = wait_readyz(m, false).await;
        assert!(why.contains("storage unavailable"), "/readyz said {why:?}");
    }
    expect_code(
        query(&mut cb, &name).await,
        Code::Unavailable,
        "QueryWriteStatus during the outage",
    );
    // Reads fail the same way, without hanging.
    let s = expect_code(
        read_digest(&mut ca, &digest(&before).read_name()).await,
        Code::Unavailable,
        "Read during the outage",
    );
    assert!(!s.message().is_empty());

    garage.restart();
    wait_readyz(&a, true).await;
    wait_readyz(&b, true).await;
    // Nothing of the failed upload is visible under its content address.
    let blob = format!("{PREFIX}blobs/{}", d.hex());
    let keys = garage.list(PREFIX).await;
    assert!(
        !keys.iter().any(|(k, _)| *k == blob),
        "half-written blob: {keys:?}"
    );
    expect_code(
        read_digest(&mut cb, &d.read_name()).await,
        Code::NotFound,
        "Read of the interrupted upload",
    );

    // The other replica reports what the store acknowledged.
    let (committed, complete) = query(&mut cb, &name)
        .await
        .expect("QueryWriteStatus after the outage");
    assert!(!complete);
    assert!(
        committed >= 16 * MIB as i64 && committed <= sent as i64,
        "committed {committed}, sent {sent}"
    );
    assert_eq!(
        query(&mut ca, &name).await.expect("QueryWriteStatus via a"),
        (committed, false),
        "both replicas see the same state"
    );

    // A resume at the wrong offset is refused, naming the right one.
    for wrong in [0, committed - MIB as i64, committed + MIB as i64] {
        let s = expect_code(
            resume(&b, &name, &data, wrong as u64).await,
            Code::InvalidArgument,
            "Write at a wrong offset",
        );
        assert!(
            s.message().contains(&format!("expected {committed}")),
            "{s:?}"
        );
    }
    // The resumed Write completes to a verified blob.
    let done = resume(&b, &name, &data, committed as u64)
        .await
        .expect("resumed Write");
    assert_eq!(done.into_inner().committed_size, data.len() as i64);
    assert_eq!(read_digest(&mut ca, &d.read_name()).await.expect("Read"), d);
    // What was stored before the outage is intact, and nothing else is left.
    assert_eq!(
        read_digest(&mut cb, &digest(&before).read_name())
            .await
            .expect("old blob"),
        digest(&before)
    );
    assert_only_blobs(&garage).await;
    let unavailable = a
        .metric(
            "memgate_object_store_requests_total",
            &[("outcome", "unavailable")],
        )
        .await;
    assert!(unavailable >= 1.0, "outage requests counted: {unavailable}");
}

/// A memgate replica killed (SIGKILL) mid-upload leaves the parts the store
/// acknowledged: another replica reports them and the upload resumes there.
/// Such an upload is garbage-collected like any other suspended one: kept
/// while younger than the expiry, removed once older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_upload_leaves_what_the_store_acknowledged() {
    let garage = Garage::start();
    let (a, b) = (start(&garage), start(&garage));
    wait_readyz(&a, true).await;
    wait_readyz(&b, true).await;
    let mut cb = client(&b);

    // Two uploads running through a when it dies.
    let (resumed, expiring) = (payload(40 * MIB, 20), payload(20 * MIB + 1, 21));
    let (rd, ed) = (digest(&resumed), digest(&expiring));
    let (rname, ename) = (write_name(&rd), write_name(&ed));
    let mut rfeed = Feed::start(&a, &rname, &resumed);
    let mut efeed = Feed::start(&a, &ename, &expiring);
    rfeed.send(24 * MIB).await;
    efeed.send(12 * MIB).await;
    // Acknowledged parts, as the other replica sees them: 8 MiB each.
    wait_for_committed(&mut cb, &rname, |c| c >= 2 * PART as i64).await;
    wait_for_committed(&mut cb, &ename, |c| c >= PART as i64).await;
    drop(a);
    // (What code a client sees for a dead server is its transport's business:
    // tonic says UNKNOWN "transport error".)
    for feed in [rfeed, efeed] {
        feed.result().await.expect_err("the replica died");
    }

    // Whole parts only: what was still filling a part buffer died with a.
    let committed = query(&mut cb, &rname).await.expect("QueryWriteStatus").0;
    let expiring_committed = query(&mut cb, &ename).await.expect("QueryWriteStatus").0;
    assert!(
        [2 * PART as i64, 3 * PART as i64].contains(&committed),
        "committed {committed} of 24 MiB sent"
    );
    assert_eq!(expiring_committed, PART as i64, "of 12 MiB sent");
    assert_eq!(garage.open_uploads(PREFIX).await.len(), 2);

    // Younger than the expiry: kept.
    let gc = garage.access().store(&garage.endpoint(), PREFIX);
    assert_eq!(
        gc.collect_garbage(Duration::from_secs(3600))
            .await
            .expect("gc"),
        0
    );
    // One resumes on b (taking its open upload over) and completes.
    let done = resume(&b, &rname, &resumed, committed as u64)
        .await
        .expect("resumed Write");
    assert_eq!(done.into_inner().committed_size, resumed.len() as i64);
    assert_eq!(
        read_digest(&mut cb, &rd.read_name()).await.expect("Read"),
        rd
    );
    // The other, left alone, expires: its parts were last written more than
    // 50 ms ago once 60 ms have passed (wall-clock age is what is under test).
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        gc.collect_garbage(Duration::from_millis(50))
            .await
            .expect("gc"),
        1
    );
    expect_code(
        query(&mut cb, &ename).await,
        Code::NotFound,
        "QueryWriteStatus of the expired upload",
    );
    assert_only_blobs(&garage).await;
}

/// What Garage 2.5 does with S3's conditional writes, which memgate would use
/// to let only one of two racing replicas commit (If-None-Match: * creates
/// only if the key is absent; If-Match: <etag> replaces only that version): it
/// ignores both headers on PutObject and overwrites. memgate therefore relies
/// on nothing but its own verification (see docs/storage.md); this test says
/// so the day a Garage version starts honouring them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_2_5_ignores_conditional_writes() {
    use object_store::{
        ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion, aws::S3ConditionalPut,
        path::Path as Key,
    };
    let garage = Garage::start();
    let client = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(garage.endpoint())
        .with_region("garage")
        .with_bucket_name(BUCKET)
        .with_access_key_id(&garage.key_id)
        .with_secret_access_key(&garage.secret)
        .with_allow_http(true)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .build()
        .expect("S3 client");
    let key = Key::from("conditional/x");
    let first = client.put(&key, "one".into()).await.expect("put");
    let create = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    client
        .put_opts(&key, "two".into(), create)
        .await
        .expect("If-None-Match: * on an existing key: AWS refuses it (412), Garage 2.5 does not");
    let stale = PutOptions {
        mode: PutMode::Update(UpdateVersion {
            e_tag: first.e_tag.clone(),
            version: None,
        }),
        ..PutOptions::default()
    };
    client
        .put_opts(&key, "three".into(), stale)
        .await
        .expect("If-Match with a replaced ETag: AWS refuses it (412), Garage 2.5 does not");
    let now = client
        .get(&key)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(&now[..], b"three", "every conditional put overwrote");
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
