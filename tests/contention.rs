//! Contention: memory held by streams that do not use it goes back to calls
//! that wait for it (issue 13). A real in-process server, real tonic clients on
//! their own loopback addresses, a guard reading a fake cgroup so the budget is
//! exact. The watchdog's `stream_idle_timeout` is far longer than each test, so
//! whatever ends a quiet stream here is the reclaimer.

#[path = "support/guarded.rs"]
mod guarded;
mod support;
#[path = "support_fakecg/mod.rs"]
mod support_fakecg;
mod support_s3;

use std::time::{Duration, Instant};

use bytes::Bytes;
use guarded::*;
use support::{
    bytestream, digest, payload, query, read_digest, wait_for_committed, write_name, write_requests,
};
use support_fakecg::MIB;
use tonic::{Code, Status};

/// Longer than any test: a stream ended here was reclaimed, not cut as stalled.
const WATCHDOG: Duration = Duration::from_secs(120);

/// `memgate_memory_reclaimed_total{method="Write", reason}`.
fn reclaims(s: &Server, reason: &str) -> u64 {
    let text = s.metrics.encode(&s.guard);
    let series =
        format!("memgate_memory_reclaimed_total{{method=\"{WRITE}\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

fn assert_reclaimed(status: &Status, why: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("memory reclaimed") && status.message().contains(why),
        "{:?}",
        status.message()
    );
    assert!(pushback(status).is_some(), "no pushback: {status:?}");
}

/// A flooder on its own address fills the budget with uploads that send one
/// message and go quiet; a well-behaved client on another address asks for
/// memory. The flooder's quiet streams over its share are reclaimed at once
/// (reason share), the good client's upload is admitted on its first try and
/// verified, and every reclaimed stream got a status it can act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_flood_gives_the_budget_back_to_a_waiting_client() {
    let s = Server::start(128 * MIB, None, |c| {
        c.server.stream_idle_timeout = WATCHDOG;
    })
    .await;
    let budget = s.guard.view().budget;
    let base = payload(MIB as usize, 7);
    // More streams than the budget holds (each reserves 7.1 MiB once its first
    // 1 MiB message is in), all at once, each on its own connection; each
    // declares a 64 MiB blob it will never finish.
    let stalled: Vec<Stalled> = (0u64..20)
        .map(|i| {
            let name = format!(
                "uploads/{}/blobs/{i:064x}/{}",
                uuid::Uuid::new_v4(),
                64 * MIB
            );
            let first = write_requests(&name, &base, 0, MIB as usize, false)
                .into_iter()
                .take(1)
                .collect();
            stall(s.channel_from(CLIENT_B), first)
        })
        .collect();
    // Full: the next flood stream had to wait (admitted calls leave the wait room).
    s.until("the flood to fill the budget", |v| v.waiting > 0)
        .await;
    let full = s.guard.view();
    assert!(
        full.largest_client > budget / 2,
        "the flooder should hold more than its share before anyone waits: {full:?}"
    );

    let good = s.channel_from(CLIENT_A);
    let data = payload(8 * MIB as usize, 3);
    let started = Instant::now();
    let tries = upload_politely(good.clone(), &data).await;
    let took = started.elapsed();
    assert_eq!(
        tries, 1,
        "the good client waited in the queue instead of bouncing"
    );
    assert!(
        took < Duration::from_secs(5),
        "the good client waited {took:?}"
    );
    assert_eq!(
        read_digest(&mut bytestream(good), &digest(&data).read_name())
            .await
            .expect("Read"),
        digest(&data)
    );
    assert!(reclaims(&s, "share") > 0, "no share reclaim");
    // Every flood stream that ended early was reclaimed, or refused before it
    // held anything (no room left to wait), with a status it can act on.
    let mut reclaimed = 0;
    for st in stalled {
        drop(st.tx);
        let (result, _) = st.task.await.unwrap();
        match result {
            Err(status) if status.message().starts_with("memory reclaimed") => {
                assert_reclaimed(&status, "max_client_share");
                reclaimed += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(pushback(&status).is_some(), "{status:?}");
            }
            Ok(_) => {}
        }
    }
    assert!(reclaimed > 0);
    s.until("every reservation to come back", |v| v.reserved == 0)
        .await;
    s.stop().await;
}

/// One client's upload sends 3 MiB and goes quiet; another client's call does
/// not fit beside it. After `memory.reclaim_grace` the quiet upload is
/// reclaimed (reason idle), and resumed at once from QueryWriteStatus's
/// committed size it completes to a verified blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_upload_resumes_at_once_to_a_verified_blob() {
    let s = Server::start(64 * MIB, None, |c| {
        c.server.stream_idle_timeout = WATCHDOG;
        c.memory.reclaim_grace = Duration::from_millis(300);
        // The idle rule alone: no client is over a share.
        c.memory.max_client_share = 1.0;
    })
    .await;
    let a = s.channel_from(CLIENT_A);
    let data = payload(12 * MIB as usize, 11);
    let d = digest(&data);
    let name = write_name(&d);
    let reqs = write_requests(&name, &data, 0, MIB as usize, true);
    let quiet = stall(a.clone(), reqs.iter().take(3).cloned().collect());
    s.until("the upload to hold its messages", |v| {
        v.reserved >= s.write_reservation() + 2 * MIB
    })
    .await;
    let held = s.guard.view().reserved;

    // A Process call (it reserves its message) that fits only once the quiet
    // upload's memory comes back.
    let other = tokio::spawn(process(
        s.channel_from(CLIENT_B),
        beyond_what_is_free(&s) as usize,
    ));

    let (result, took) = quiet.task.await.unwrap();
    let status = result.expect_err("the quiet upload is reclaimed");
    assert_reclaimed(&status, "memory.reclaim_grace");
    assert!(
        took >= Duration::from_millis(300),
        "reclaimed after {took:?}"
    );
    assert_eq!(reclaims(&s, "idle"), 1);
    other
        .await
        .unwrap()
        .expect("the waiting call got in on its first try");
    let _ = held;

    // Resumed right away: QueryWriteStatus waits for the stream to let go.
    let mut c = bytestream(a);
    let (committed, complete) = query(&mut c, &name).await.expect("QueryWriteStatus");
    assert_eq!((committed, complete), (3 * MIB as i64, false));
    resume_to_verified_blob(&mut c, &name, &data, committed).await;
    s.until("every reservation to come back", |v| v.reserved == 0)
        .await;
    s.stop().await;
}

/// An upload that keeps sending is never quiet: a call waiting behind it is
/// served when it finishes, and nothing is reclaimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_keeps_sending_is_never_reclaimed() {
    let s = Server::start(48 * MIB, None, |c| {
        c.server.stream_idle_timeout = WATCHDOG;
        c.memory.reclaim_grace = Duration::from_millis(200);
        c.memory.max_client_share = 1.0;
    })
    .await;
    let data = payload(24 * MIB as usize, 21);
    let d = digest(&data);
    let name = write_name(&d);
    // 256 KiB every 30 ms: ~8 MB/s, far below loopback speed, never quiet for
    // anything near the grace.
    let reqs = write_requests(&name, &data, 0, 256 * 1024, true);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let feeder = tokio::spawn(async move {
        for r in reqs {
            tx.send(r).await.expect("the upload takes every message");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    let mut steady = bytestream(s.channel_from(CLIENT_A));
    let upload = tokio::spawn(async move {
        steady
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().committed_size)
    });
    s.until("the upload to be admitted", |v| v.reserved > 0)
        .await;
    s.until("the upload to hold its messages", |v| {
        v.reserved >= s.write_reservation() + 256 * 1024
    })
    .await;
    let waiter = tokio::spawn(process(
        s.channel_from(CLIENT_B),
        beyond_what_is_free(&s) as usize,
    ));
    s.until("the Process call to wait", |v| v.waiting > 0).await;
    assert_eq!(
        upload.await.unwrap().expect("the steady upload completes"),
        data.len() as i64
    );
    feeder.await.unwrap();
    waiter
        .await
        .unwrap()
        .expect("the waiting call is served once the upload ends");
    assert_eq!(reclaims(&s, "idle") + reclaims(&s, "share"), 0);
    let mut c = bytestream(s.channel_from(CLIENT_A));
    assert_eq!(read_digest(&mut c, &d.read_name()).await.expect("Read"), d);
    s.stop().await;
}

/// The limit drops below what is reserved (an in-place pod resize): the
/// budget reports itself exceeded, the quiet upload holding the memory is
/// reclaimed (reason overcommit) and resumes once the limit is back. (What
/// readiness says meanwhile is the health unit test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_shrinking_below_the_reservations_reclaims_and_recovers() {
    let s = Server::start(128 * MIB, None, |c| {
        c.server.stream_idle_timeout = WATCHDOG;
    })
    .await;
    let a = s.channel_from(CLIENT_A);
    let data = payload(16 * MIB as usize, 31);
    let d = digest(&data);
    let name = write_name(&d);
    let reqs = write_requests(&name, &data, 0, MIB as usize, true);
    let quiet = stall(a.clone(), reqs.iter().take(2).cloned().collect());
    s.until("the upload to hold its messages", |v| {
        v.reserved >= s.write_reservation() + MIB
    })
    .await;
    // Both messages are in the partial file before the limit moves: a reclaim
    // at critical pressure may end the stream whether it is quiet or not.
    wait_for_committed(&mut bytestream(a.clone()), &name, |c| c == 2 * MIB as i64).await;
    // 16 MiB leaves a budget of 16 × 0.85 − 4 ≈ 9.6 MiB, below the 8 MiB in
    // use plus what the upload holds.
    s.cg.set_limit(16 * MIB);
    let (result, _) = quiet.task.await.unwrap();
    assert_reclaimed(&result.expect_err("reclaimed"), "memory limit fell below");
    assert_eq!(reclaims(&s, "overcommit"), 1);
    s.until("the reservations to fit again", |v| v.overcommitted == 0)
        .await;
    s.cg.set_limit(128 * MIB);
    let mut c = bytestream(a);
    let (committed, _) = query(&mut c, &name).await.expect("QueryWriteStatus");
    assert_eq!(committed, 2 * MIB as i64);
    s.until("the budget to be back", |v| v.budget > 64 * MIB)
        .await;
    resume_to_verified_blob(&mut c, &name, &data, committed).await;
    s.stop().await;
}

/// Resumes the upload `name` of `data` at `committed` in 1 MiB messages, and
/// checks that it completes and reads back with its digest.
async fn resume_to_verified_blob(
    c: &mut memgate::proto::bytestream::byte_stream_client::ByteStreamClient<
        tonic::transport::Channel,
    >,
    name: &str,
    data: &Bytes,
    committed: i64,
) {
    let rest = write_requests(
        name,
        &data.slice(committed as usize..),
        committed as u64,
        MIB as usize,
        true,
    );
    let resp = c
        .write(tokio_stream::iter(rest))
        .await
        .expect("the resumed upload");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    let d = digest(data);
    assert_eq!(read_digest(c, &d.read_name()).await.expect("Read"), d);
}

/// A Process call of `len` bytes (no echo); the digest it answers is checked.
async fn process(ch: tonic::transport::Channel, len: usize) -> Result<(), Status> {
    let data: Bytes = payload(len, len as u64);
    let resp = memgate::client::process(ch, data.clone(), false).await?;
    assert_eq!(resp.size, len as u64);
    Ok(())
}

/// A message size that does not fit beside what is reserved now, but fits
/// once the budget's current reservations are gone.
fn beyond_what_is_free(s: &Server) -> u64 {
    let v = s.guard.view();
    let room = memgate::guard::budget::Limits::wait_room_for(
        memgate::server::STREAM_WINDOW as u64,
        v.budget,
    );
    let free = v.budget - v.baseline.max(v.used) - v.reserved - room;
    let len = free + 2 * MIB;
    assert!(len + 2 * MIB < v.budget - v.baseline - room, "{v:?}");
    len
}
