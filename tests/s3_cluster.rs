//! memgate on a distributed object store: a three-node Garage cluster with
//! replication factor 3 (writes need two nodes), three memgate replicas, each
//! talking to a different node, sharing one bucket. What must hold when a node
//! dies: an upload whose node survives completes through the quorum; one whose
//! node dies fails UNAVAILABLE and resumes elsewhere from what the cluster
//! acknowledged; reads keep working with one node down; each replica's
//! readiness follows the node it talks to and the quorum behind it. And when
//! two replicas race on one upload name, no wrong blob is ever committed and
//! the loser gets a clear error.
//!
//! The cluster starts once for the whole binary (about five seconds, and three
//! Garage processes): nextest runs every test in a process of its own, so the
//! scenarios are one test, run in order on the same cluster, each under its
//! own key prefix and each leaving every node running.

mod support;
mod support_s3;

use std::time::Instant;

use bytes::Bytes;
use support::{process::Memgate, *};
use support_s3::{
    Cluster, NODES,
    replica::{Feed, MIB, PART, assert_only_blobs, client, replica, resume, wait_readyz},
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_garage_cluster() {
    let started = Instant::now();
    let mut cluster = Cluster::start();
    eprintln!("cluster up in {:?}", started.elapsed());
    macro_rules! scenario {
        ($name:ident) => {
            let t = Instant::now();
            eprintln!("scenario {} ...", stringify!($name));
            $name(&mut cluster, stringify!($name)).await;
            eprintln!("scenario {} ok in {:?}", stringify!($name), t.elapsed());
            cluster.heal();
        };
    }
    scenario!(three_replicas_share_the_bucket);
    scenario!(a_node_dies_mid_upload_and_the_quorum_carries_on);
    scenario!(the_node_under_a_replica_dies_mid_upload);
    scenario!(readiness_follows_the_quorum);
    scenario!(replicas_racing_on_one_upload_name);
    eprintln!("all scenarios in {:?}", started.elapsed());
}

/// Three replicas, replica `i` on node `i`, keys under `prefix/`.
struct Replicas {
    r: Vec<Memgate>,
    prefix: String,
}

impl Replicas {
    async fn start(cluster: &Cluster, name: &str) -> Self {
        let prefix = format!("{name}/");
        let r: Vec<Memgate> = (0..NODES)
            .map(|i| replica(cluster.access(), &cluster.endpoint(i), &prefix))
            .collect();
        for m in &r {
            wait_readyz(m, true).await;
        }
        Self { r, prefix }
    }

    async fn assert_only_blobs(&self, cluster: &Cluster, via: usize) {
        assert_only_blobs(cluster.access(), &cluster.endpoint(via), &self.prefix).await;
    }
}

async fn read_back(m: &Memgate, d: &memgate::api::resource::Digest, what: &str) {
    let got = read_digest(&mut client(m), &d.read_name())
        .await
        .unwrap_or_else(|s| panic!("{what}: {s:?}"));
    assert_eq!(got, *d, "{what}");
}

/// A blob written through any replica reads back through every other; an
/// upload paused on one is seen by the next, continued there, and finished
/// on the third.
async fn three_replicas_share_the_bucket(cluster: &mut Cluster, name: &str) {
    let rs = Replicas::start(cluster, name).await;
    for (i, from) in rs.r.iter().enumerate() {
        let data = payload(9 * MIB + i, 100 + i as u64);
        let d = digest(&data);
        upload(&mut client(from), &data)
            .await
            .unwrap_or_else(|s| panic!("upload via replica {i}: {s:?}"));
        for (j, to) in rs.r.iter().enumerate() {
            read_back(to, &d, &format!("written via {i}, read via {j}")).await;
        }
    }

    let data = payload(30 * MIB + 5, 110);
    let d = digest(&data);
    let wname = write_name(&d);
    let pause = |m: &Memgate, from: usize, to: usize| {
        let reqs = write_requests(&wname, &data.slice(from..to), from as u64, MIB, false);
        let mut c = client(m);
        async move { c.write(tokio_stream::iter(reqs)).await }
    };
    let first = pause(&rs.r[0], 0, 10 * MIB)
        .await
        .expect("first third via 0");
    assert_eq!(first.into_inner().committed_size, 10 * MIB as i64);
    assert_eq!(
        query(&mut client(&rs.r[1]), &wname)
            .await
            .expect("QueryWriteStatus via 1"),
        (10 * MIB as i64, false)
    );
    let second = pause(&rs.r[1], 10 * MIB, 20 * MIB)
        .await
        .expect("second third via 1");
    assert_eq!(second.into_inner().committed_size, 20 * MIB as i64);
    let done = resume(&rs.r[2], &wname, &data, 20 * MIB as u64)
        .await
        .expect("the rest via 2");
    assert_eq!(done.into_inner().committed_size, data.len() as i64);
    read_back(&rs.r[0], &d, "the upload finished via 2, read via 0").await;
    rs.assert_only_blobs(cluster, 0).await;
}

/// Node 3 dies mid-upload. The replica writing talks to node 1, which still
/// has a quorum (itself and node 2): the upload completes. (Should a part
/// outlast memgate's retries while Garage notices the death, the Write fails
/// UNAVAILABLE instead and resumes from what was acknowledged: either way it
/// ends as a verified blob.) Reads keep working, through either live node;
/// the replica on the dead node is not ready, the others are.
async fn a_node_dies_mid_upload_and_the_quorum_carries_on(cluster: &mut Cluster, name: &str) {
    let rs = Replicas::start(cluster, name).await;
    let older = payload(5 * MIB, 120);
    upload(&mut client(&rs.r[0]), &older)
        .await
        .expect("upload before the death");

    let data = payload(64 * MIB, 121);
    let d = digest(&data);
    let wname = write_name(&d);
    let mut feed = Feed::start(&rs.r[0], &wname, &data);
    feed.send(20 * MIB).await;
    wait_for_committed(&mut client(&rs.r[1]), &wname, |c| c >= PART as i64).await;
    cluster.stop(2);
    feed.send_rest().await;
    match feed.result().await {
        Ok(done) => {
            assert_eq!(done.into_inner().committed_size, data.len() as i64);
            eprintln!("  the upload completed through the quorum");
        }
        Err(s) => {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            eprintln!(
                "  the upload failed UNAVAILABLE ({}); resuming",
                s.message()
            );
            let (c, _) = query(&mut client(&rs.r[1]), &wname)
                .await
                .expect("QueryWriteStatus");
            resume(&rs.r[1], &wname, &data, c as u64)
                .await
                .expect("resumed Write");
        }
    }
    for (i, m) in rs.r[..2].iter().enumerate() {
        read_back(m, &d, &format!("new blob via {i}, node 3 down")).await;
        read_back(
            m,
            &digest(&older),
            &format!("old blob via {i}, node 3 down"),
        )
        .await;
        wait_readyz(m, true).await;
    }
    let why = wait_readyz(&rs.r[2], false).await;
    assert!(why.contains("storage unavailable"), "/readyz said {why:?}");
    assert_eq!(rs.r[2].http("/livez").await.0, 200, "not ready, but live");
    // Writes keep working too.
    let more = payload(3 * MIB, 122);
    upload(&mut client(&rs.r[1]), &more)
        .await
        .expect("upload with node 3 down");

    cluster.restart(2);
    wait_readyz(&rs.r[2], true).await;
    read_back(
        &rs.r[2],
        &d,
        "blob written while node 3 was down, via node 3",
    )
    .await;
    read_back(
        &rs.r[2],
        &digest(&more),
        "blob written while node 3 was down",
    )
    .await;
    rs.assert_only_blobs(cluster, 2).await;
}

/// Node 1 dies under replica 1 mid-upload, after at least 16 MiB were
/// acknowledged. The Write fails UNAVAILABLE; replica 2, on a live node,
/// reports what the cluster acknowledged, and the upload resumed there
/// completes; it reads back through replica 3, and through replica 1 once its
/// node is back.
async fn the_node_under_a_replica_dies_mid_upload(cluster: &mut Cluster, name: &str) {
    let rs = Replicas::start(cluster, name).await;
    let data = payload(64 * MIB, 130);
    let d = digest(&data);
    let wname = write_name(&d);
    let mut feed = Feed::start(&rs.r[0], &wname, &data);
    feed.send(24 * MIB).await;
    wait_for_committed(&mut client(&rs.r[1]), &wname, |c| c >= 2 * PART as i64).await;
    cluster.stop(0);
    let sent = feed.send_rest().await;
    let s = feed.result().await.expect_err("the replica's node died");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let why = wait_readyz(&rs.r[0], false).await;
    assert!(why.contains("storage unavailable"), "/readyz said {why:?}");

    let (c, complete) = query(&mut client(&rs.r[1]), &wname)
        .await
        .expect("QueryWriteStatus via 2");
    assert!(!complete);
    assert!(
        c >= 16 * MIB as i64 && c <= sent as i64,
        "committed {c}, sent {sent}"
    );
    let done = resume(&rs.r[1], &wname, &data, c as u64)
        .await
        .expect("resumed via 2");
    assert_eq!(done.into_inner().committed_size, data.len() as i64);
    read_back(&rs.r[2], &d, "via 3, node 1 down").await;

    cluster.restart(0);
    wait_readyz(&rs.r[0], true).await;
    read_back(&rs.r[0], &d, "via 1 once its node is back").await;
    rs.assert_only_blobs(cluster, 0).await;
}

/// Two of three nodes down: no quorum. The replica on the survivor turns not
/// ready and says why; writes, reads and QueryWriteStatus are UNAVAILABLE,
/// never NOT_FOUND. One node back: the quorum is back, and so are readiness,
/// the blob and the paused upload, which completes.
async fn readiness_follows_the_quorum(cluster: &mut Cluster, name: &str) {
    let rs = Replicas::start(cluster, name).await;
    let m = &rs.r[0];
    let kept = payload(4 * MIB, 140);
    upload(&mut client(m), &kept).await.expect("upload");
    let data = payload(12 * MIB, 141);
    let d = digest(&data);
    let wname = write_name(&d);
    let head = write_requests(&wname, &data.slice(..9 * MIB), 0, MIB, false);
    client(m)
        .write(tokio_stream::iter(head))
        .await
        .expect("paused upload");

    cluster.stop(1);
    cluster.stop(2);
    let why = wait_readyz(m, false).await;
    assert!(why.contains("storage unavailable"), "/readyz said {why:?}");
    assert_eq!(m.http("/livez").await.0, 200, "not ready, but live");
    let more = payload(2 * MIB, 142);
    expect_code(
        upload(&mut client(m), &more).await,
        Code::Unavailable,
        "Write without a quorum",
    );
    expect_code(
        read_digest(&mut client(m), &digest(&kept).read_name()).await,
        Code::Unavailable,
        "Read without a quorum",
    );
    expect_code(
        query(&mut client(m), &wname).await,
        Code::Unavailable,
        "QueryWriteStatus without a quorum",
    );

    cluster.restart(1);
    wait_readyz(m, true).await;
    read_back(m, &digest(&kept), "after the quorum came back").await;
    assert_eq!(
        query(&mut client(m), &wname)
            .await
            .expect("QueryWriteStatus"),
        (9 * MIB as i64, false)
    );
    resume(m, &wname, &data, 9 * MIB as u64)
        .await
        .expect("the paused upload completes");
    read_back(m, &d, "the resumed upload").await;
    cluster.restart(2);
    rs.assert_only_blobs(cluster, 0).await;
}

/// Two replicas on one upload name. The newest stream takes the upload over,
/// from the offset the store holds; the one it replaced ends ABORTED at its
/// next part. A stream starting at an offset the store no longer holds is
/// INVALID_ARGUMENT, naming the right one. Streams started at once: at least
/// one commits, the other's error is one of those two. A racer sending other
/// bytes under the same name never gets them committed. Whatever the order,
/// the blob that ends up under the digest is the right one.
async fn replicas_racing_on_one_upload_name(cluster: &mut Cluster, name: &str) {
    let rs = Replicas::start(cluster, name).await;
    let (a, b) = (&rs.r[0], &rs.r[1]);

    // Take-over: b resumes from what a's stream has had acknowledged.
    let data = payload(40 * MIB, 150);
    let d = digest(&data);
    let wname = write_name(&d);
    let mut first = Feed::start(a, &wname, &data);
    first.send(20 * MIB).await;
    let c = wait_for_committed(&mut client(b), &wname, |c| c >= 2 * PART as i64).await;
    let done = resume(b, &wname, &data, c as u64)
        .await
        .expect("b takes over");
    assert_eq!(done.into_inner().committed_size, data.len() as i64);
    first.send_rest().await;
    let s = first.result().await.expect_err("a's stream was taken over");
    assert_eq!(s.code(), Code::Aborted, "{s:?}");
    assert!(s.message().contains("another Write stream"), "{s:?}");
    read_back(&rs.r[2], &d, "the blob b committed").await;

    // A racer late from 0 is refused for its offset; the first stream goes on.
    let data = payload(30 * MIB, 151);
    let d = digest(&data);
    let wname = write_name(&d);
    let mut first = Feed::start(a, &wname, &data);
    first.send(12 * MIB).await;
    let c = wait_for_committed(&mut client(b), &wname, |c| c >= PART as i64).await;
    let s = expect_code(
        resume(b, &wname, &data, 0).await,
        Code::InvalidArgument,
        "a late racer from offset 0",
    );
    assert!(s.message().contains("expected"), "{s:?}");
    assert!(c > 0);
    first.send_rest().await;
    let done = first.result().await.expect("the first stream commits");
    assert_eq!(done.into_inner().committed_size, data.len() as i64);
    read_back(b, &d, "the blob a committed").await;

    // Both at once, from 0, the same bytes.
    let data = payload(24 * MIB + 3, 152);
    let d = digest(&data);
    let wname = write_name(&d);
    let (ra, rb) = tokio::join!(resume(a, &wname, &data, 0), resume(b, &wname, &data, 0));
    let ok = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert!(ok >= 1, "at least one commits: {ra:?} {rb:?}");
    for r in [&ra, &rb] {
        match r {
            Ok(done) => assert_eq!(done.get_ref().committed_size, data.len() as i64),
            Err(s) => assert!(
                matches!(s.code(), Code::Aborted | Code::InvalidArgument),
                "{s:?}"
            ),
        }
    }
    read_back(&rs.r[2], &d, "the blob of two simultaneous streams").await;

    // A racer with other bytes under the same name: never committed.
    let data = payload(24 * MIB, 153);
    let d = digest(&data);
    let wname = write_name(&d);
    let mut forged = data.to_vec();
    forged[20 * MIB] ^= 1;
    let forged = Bytes::from(forged);
    let (honest, bad) = tokio::join!(resume(a, &wname, &data, 0), resume(b, &wname, &forged, 0));
    let s = bad.expect_err("the forged bytes are never committed");
    assert!(
        matches!(s.code(), Code::Aborted | Code::InvalidArgument),
        "{s:?}"
    );
    match honest {
        Ok(done) => assert_eq!(done.into_inner().committed_size, data.len() as i64),
        Err(s) => {
            assert!(
                matches!(s.code(), Code::Aborted | Code::InvalidArgument),
                "{s:?}"
            );
            // The honest client does what a client does: asks where the
            // upload stands (nothing of the forger's is kept) and resumes.
            let c = match query(&mut client(a), &wname).await {
                Ok((c, _)) => c,
                Err(s) if s.code() == Code::NotFound => 0,
                Err(s) => panic!("QueryWriteStatus: {s:?}"),
            };
            let retried = resume(a, &wname, &data, c as u64).await.expect("retry");
            assert_eq!(retried.into_inner().committed_size, data.len() as i64);
        }
    }
    read_back(&rs.r[2], &d, "the honest blob").await;
    rs.assert_only_blobs(cluster, 2).await;
}
