//! The local store's disk budget, on small real filesystems mounted by the test
//! (a 220 MiB tmpfs, which can preallocate, and an ext2 loop mount, which
//! cannot), against the real `memgate serve` binary and a real tonic client:
//!
//! - an upload that does not fit is refused before its first byte with
//!   RESOURCE_EXHAUSTED naming both numbers, and a small one still fits;
//! - concurrent uploads count each other's reservations;
//! - a preallocated upload survives the disk filling from outside;
//! - without preallocation, a disk filled from outside ends the upload with
//!   RESOURCE_EXHAUSTED, keeps exactly what it committed and resumes to a
//!   verified blob once space is freed; another I/O error (a file-size limit,
//!   EFBIG) keeps the committed bytes too;
//! - reads, readiness, `/metrics` and `memgate limits` on a full disk.
//!
//! Mounting needs root. Without it each test prints `skipped: <reason>` and
//! passes; `MEMGATE_REQUIRE_MOUNT=1` (or `MEMGATE_REQUIRE_CGROUP=1`, which CI
//! sets for the cgroup tests: a machine that makes cgroups can mount) turns a
//! skip into a failure.

mod support;

use std::{
    fs::File,
    io::Write as _,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use bytes::Bytes;
use memgate::proto::bytestream::{
    WriteRequest, WriteResponse, byte_stream_client::ByteStreamClient,
};
use support::{process::Memgate, *};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, transport::Channel};

const MIB: u64 = 1 << 20;
const CHUNK: usize = MIB as usize;
/// The size memgate is built for: 150 MB.
const BIG: usize = 150 * 1000 * 1000;
/// `storage.min_free_space`'s default.
const FLOOR: u64 = 64 * MIB;
/// The defaults, with the floor written out so the figures below follow it.
const CONFIG: &str = "[storage]\nmin_free_space = \"64MiB\"\n";

// ---------------------------------------------------------------------------
// Filesystems

#[derive(Clone, Copy, Debug)]
enum Fs {
    /// Preallocates with fallocate(FALLOC_FL_KEEP_SIZE).
    Tmpfs,
    /// No extents, so no fallocate: the budget is only counted.
    Ext2,
}

/// A filesystem of `size` MiB mounted on a fresh directory; unmounted on drop.
struct Volume {
    path: PathBuf,
    // Dropped after the unmount: holds the mount point and the ext2 image.
    _root: tempfile::TempDir,
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Volume {
    fn mount(fs: Fs, size_mib: u64) -> Result<Self, String> {
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = root.path().join("mnt");
        std::fs::create_dir(&path).map_err(|e| e.to_string())?;
        match fs {
            Fs::Tmpfs => run(
                "mount",
                &[
                    "-t".as_ref(),
                    "tmpfs".as_ref(),
                    "-o".as_ref(),
                    format!("size={size_mib}m").as_ref(),
                    "tmpfs".as_ref(),
                    path.as_os_str(),
                ],
            )?,
            Fs::Ext2 => {
                let image = root.path().join("fs.img");
                File::create(&image)
                    .and_then(|f| f.set_len(size_mib * MIB))
                    .map_err(|e| e.to_string())?;
                // No blocks reserved for root, few inodes: nearly all of it is data.
                run(
                    "mkfs.ext2",
                    &[
                        "-q".as_ref(),
                        "-F".as_ref(),
                        "-m".as_ref(),
                        "0".as_ref(),
                        "-i".as_ref(),
                        "1048576".as_ref(),
                        image.as_os_str(),
                    ],
                )?;
                run(
                    "mount",
                    &[
                        "-o".as_ref(),
                        "loop".as_ref(),
                        image.as_os_str(),
                        path.as_os_str(),
                    ],
                )?;
            }
        }
        Ok(Self { path, _root: root })
    }

    /// Mounts, or explains why not: `None` (the test returns early) after
    /// printing `skipped: <reason>`, or a panic when mounts are required.
    fn require(fs: Fs, size_mib: u64) -> Option<Self> {
        match Self::mount(fs, size_mib) {
            Ok(v) => Some(v),
            Err(why) => {
                let required = ["MEMGATE_REQUIRE_MOUNT", "MEMGATE_REQUIRE_CGROUP"]
                    .iter()
                    .any(|k| std::env::var(k).as_deref() == Ok("1"));
                assert!(
                    !required,
                    "mounting a {fs:?} is required here but failed: {why}"
                );
                eprintln!("skipped: cannot mount a {fs:?} (needs root): {why}");
                None
            }
        }
    }

    /// (free for unprivileged writers, capacity), as statvfs says.
    fn statvfs(&self) -> (u64, u64) {
        memgate::store::statvfs(&self.path).unwrap()
    }

    /// Writes zeros from outside memgate until the filesystem is full; returns
    /// the file, which holds the space until removed.
    fn fill(&self) -> PathBuf {
        let path = self.path.join("filler");
        let mut f = File::create(&path).unwrap();
        let zeros = vec![0u8; CHUNK];
        loop {
            match f.write(&zeros) {
                Ok(0) => panic!("write returned 0 before the disk was full"),
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                    break;
                }
            }
        }
        f.sync_all().unwrap();
        assert!(
            self.statvfs().0 < MIB,
            "still free after filling: {}",
            self.statvfs().0
        );
        path
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        // Lazily if something still has a file open on it (a server that panicked).
        if run("umount", &[self.path.as_os_str()]).is_err() {
            let _ = run("umount", &["-l".as_ref(), self.path.as_os_str()]);
        }
    }
}

/// memgate on `volume`: its data directory is a link to the mount point.
fn start(volume: &Volume, config: &str) -> Memgate {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&volume.path, dir.path().join("data")).unwrap();
    Memgate::start_in(dir, config)
}

fn client(m: &Memgate) -> ByteStreamClient<Channel> {
    bytestream(
        tonic::transport::Endpoint::from_shared(m.grpc.clone())
            .unwrap()
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .connect_lazy(),
    )
}

// ---------------------------------------------------------------------------
// Uploads driven message by message

/// A Write whose messages the test sends when it wants.
struct OpenWrite {
    name: String,
    data: Bytes,
    sent: usize,
    tx: Option<mpsc::Sender<WriteRequest>>,
    call: JoinHandle<Result<WriteResponse, Status>>,
}

impl OpenWrite {
    /// Starts writing `data` from `offset`, sending nothing yet.
    fn start(client: &ByteStreamClient<Channel>, name: &str, data: &Bytes, offset: usize) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let mut client = client.clone();
        let call = tokio::spawn(async move {
            client
                .write(ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        });
        Self {
            name: name.to_string(),
            data: data.clone(),
            sent: offset,
            tx: Some(tx),
            call,
        }
    }

    /// Sends the next `len` bytes (the first message carries the name), with
    /// `finish_write` on the message that reaches the end. `false` when the
    /// server has already ended the call.
    async fn send(&mut self, len: usize) -> bool {
        let end = (self.sent + len).min(self.data.len());
        let tx = self.tx.as_ref().expect("sender open");
        let mut pos = self.sent;
        loop {
            let next = (pos + CHUNK).min(end);
            let req = WriteRequest {
                resource_name: self.name.clone(),
                write_offset: pos as i64,
                finish_write: next == self.data.len(),
                data: self.data.slice(pos..next),
            };
            if tx.send(req).await.is_err() {
                return false;
            }
            pos = next;
            self.sent = pos;
            if pos >= end {
                return true;
            }
        }
    }

    /// Sends whatever is left, then waits (bounded) for the answer.
    async fn finish(mut self) -> Result<WriteResponse, Status> {
        let rest = self.data.len() - self.sent;
        if rest > 0 || self.sent == 0 {
            self.send(rest).await;
        }
        self.answer().await
    }

    /// The server's answer, without sending anything more (bounded wait).
    async fn answer(mut self) -> Result<WriteResponse, Status> {
        let answer = tokio::time::timeout(Duration::from_secs(60), &mut self.call)
            .await
            .expect("the Write was answered within 60 s")
            .expect("the Write task");
        drop(self.tx.take());
        answer
    }
}

/// Writes `data` (from `offset`) in one call.
async fn write_from(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    data: &Bytes,
    offset: u64,
) -> Result<i64, Status> {
    let rest = data.slice(offset as usize..);
    client
        .write(tokio_stream::iter(write_requests(
            name, &rest, offset, CHUNK, true,
        )))
        .await
        .map(|r| r.into_inner().committed_size)
}

/// Starts an upload of `data` with only its first 1 MiB message and returns
/// the answer, which must come without the client sending anything more.
async fn refused_up_front(client: &ByteStreamClient<Channel>, data: &Bytes) -> (String, Status) {
    let name = write_name(&digest(data));
    let mut w = OpenWrite::start(client, &name, data, 0);
    w.send(CHUNK).await;
    let status = expect_code(
        w.answer().await,
        Code::ResourceExhausted,
        "an upload that does not fit",
    );
    (name, status)
}

/// The `.part` files in `data/uploads`.
fn partials(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("uploads"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The resume offset a RESOURCE_EXHAUSTED mid-upload names.
fn resume_offset(message: &str) -> u64 {
    let at = message
        .find("write_offset ")
        .unwrap_or_else(|| panic!("no write_offset in {message:?}"));
    message[at + "write_offset ".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A byte count as memgate's messages print it.
fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

async fn disk_metric(m: &Memgate, name: &str) -> u64 {
    m.metric(&format!("memgate_storage_{name}_bytes"), &[])
        .await as u64
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_220_mib_a_second_150_mb_upload_is_refused_up_front_and_1_mb_still_fits() {
    let Some(vol) = Volume::require(Fs::Tmpfs, 220) else {
        return;
    };
    let m = start(&vol, CONFIG);
    let mut c = client(&m);
    assert_eq!(disk_metric(&m, "capacity").await, 220 * MIB);
    assert_eq!(disk_metric(&m, "min_free").await, FLOOR);
    assert_eq!(disk_metric(&m, "free").await, vol.statvfs().0);

    let first = payload(BIG, 1);
    assert_eq!(
        upload(&mut c, &first).await.expect("the first 150 MB"),
        BIG as i64
    );

    // 77 MiB are left: 13 MiB above the floor, so the second is refused before
    // its second message, and leaves nothing behind.
    let second = payload(BIG, 2);
    let (free, _) = vol.statvfs();
    let (name, status) = refused_up_front(&c, &second).await;
    let msg = status.message();
    assert!(
        msg.contains(&format!("still needs {}", mib(BIG as u64))),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("but {} are free above", mib(free - FLOOR))),
        "{msg}"
    );
    assert!(msg.contains("storage.min_free_space"), "{msg}");
    assert!(partials(&vol.path).is_empty(), "{:?}", partials(&vol.path));
    expect_code(
        query(&mut c, &name).await,
        Code::NotFound,
        "QueryWriteStatus of the refused upload",
    );
    assert_eq!(vol.statvfs().0, free, "the refusal took no space");

    let small = payload(MIB as usize, 3);
    assert_eq!(
        upload(&mut c, &small)
            .await
            .expect("1 MB after the refusal"),
        MIB as i64
    );
    // Reads, readiness and the figures, with the disk as full as uploads may make it.
    let d = digest(&first);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.unwrap(), d);
    assert_eq!(m.http("/readyz").await, (200, "ready\n".into()));
    let (free, _) = vol.statvfs();
    assert_eq!(disk_metric(&m, "free").await, free);
    assert_eq!(disk_metric(&m, "admittable").await, free - FLOOR);
    assert_eq!(disk_metric(&m, "reserved").await, 0);
}

async fn concurrent_uploads_count_each_others_reservations(fs: Fs) {
    let Some(vol) = Volume::require(fs, 256) else {
        return;
    };
    let m = start(&vol, CONFIG);
    let c = client(&m);
    let a = payload(BIG, 10);
    let name_a = write_name(&digest(&a));
    let mut w = OpenWrite::start(&c, &name_a, &a, 0);
    w.send(8 * CHUNK).await;
    let committed = wait_for_committed(&mut c.clone(), &name_a, |n| n >= 8 * MIB as i64).await;
    let reserved = disk_metric(&m, "reserved").await;
    assert!(
        reserved > 0 && reserved <= BIG as u64 - committed as u64,
        "reserved {reserved} with {committed} of {BIG} written"
    );

    // The disk has room for either upload, not both.
    let (_, status) = refused_up_front(&c, &payload(BIG, 11)).await;
    assert!(
        status.message().contains("uploads in progress have"),
        "{}",
        status.message()
    );

    let done = w.finish().await.expect("the first upload, finished");
    assert_eq!(done.committed_size, BIG as i64);
    let d = digest(&a);
    assert_eq!(
        read_digest(&mut c.clone(), &d.read_name()).await.unwrap(),
        d
    );
    assert_eq!(disk_metric(&m, "reserved").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_count_each_others_preallocations_on_tmpfs() {
    concurrent_uploads_count_each_others_reservations(Fs::Tmpfs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_count_each_others_reservations_on_ext2_without_fallocate() {
    concurrent_uploads_count_each_others_reservations(Fs::Ext2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preallocated_upload_survives_the_disk_filling_from_outside() {
    let Some(vol) = Volume::require(Fs::Tmpfs, 220) else {
        return;
    };
    let m = start(&vol, CONFIG);
    let mut c = client(&m);
    let data = payload(BIG, 20);
    let name = write_name(&digest(&data));
    let mut w = OpenWrite::start(&c, &name, &data, 0);
    w.send(16 * CHUNK).await;
    wait_for_committed(&mut c, &name, |n| n >= 16 * MIB as i64).await;

    // Everything not preallocated goes to another writer.
    let filler = vol.fill();
    assert_eq!(
        w.finish()
            .await
            .expect("the upload, on a full disk")
            .committed_size,
        BIG as i64
    );
    let d = digest(&data);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.unwrap(), d);

    // A full disk refuses new uploads up front, and serves reads and readiness.
    let small = payload(MIB as usize, 21);
    let (_, status) = refused_up_front(&c, &small).await;
    assert!(
        status.message().contains("but 0 MiB are free above"),
        "{}",
        status.message()
    );
    assert_eq!(m.http("/readyz").await.0, 200);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.unwrap(), d);
    std::fs::remove_file(filler).unwrap();
    assert_eq!(
        upload(&mut c, &small)
            .await
            .expect("1 MB once space is freed"),
        MIB as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_gives_its_preallocation_back_and_resumes() {
    let Some(vol) = Volume::require(Fs::Tmpfs, 220) else {
        return;
    };
    let m = start(&vol, CONFIG);
    let mut c = client(&m);
    let data = payload(BIG, 25);
    let name = write_name(&digest(&data));
    let mut w = OpenWrite::start(&c, &name, &data, 0);
    w.send(8 * CHUNK).await;
    wait_for_committed(&mut c, &name, |n| n >= 8 * MIB as i64).await;
    // The whole upload is preallocated while it runs.
    assert!(
        vol.statvfs().0 < 220 * MIB - BIG as u64 + MIB,
        "{}",
        vol.statvfs().0
    );
    // The client vanishes mid-upload.
    w.call.abort();
    drop(w.tx.take());
    // Bounded polling of the real state: the reservation is given back once the
    // stream's data is durable, and the volume holds only what was written.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while disk_metric(&m, "reserved").await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reservation was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let committed = query(&mut c, &name).await.expect("QueryWriteStatus").0 as u64;
    let (free, _) = vol.statvfs();
    assert!(
        free >= 220 * MIB - committed - MIB,
        "free {free} with {committed} committed"
    );
    let part = partials(&vol.path);
    assert_eq!(
        std::fs::metadata(&part[0]).unwrap().blocks() * 512,
        committed.next_multiple_of(4096)
    );
    // Another 150 MB upload fits now only because that space came back; then
    // the cut one cannot, and says so, until that one is gone.
    let other = payload(BIG, 26);
    assert_eq!(
        upload(&mut c, &other)
            .await
            .expect("150 MB in the released space"),
        BIG as i64
    );
    expect_code(
        write_from(&mut c, &name, &data, committed).await,
        Code::ResourceExhausted,
        "resuming with the space taken",
    );
    let od = digest(&other);
    std::fs::remove_file(vol.path.join("blobs").join(&od.hex()[..2]).join(od.hex())).unwrap();
    assert_eq!(
        write_from(&mut c, &name, &data, committed)
            .await
            .expect("the resume"),
        BIG as i64
    );
    let d = digest(&data);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.unwrap(), d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_preallocation_a_disk_filled_mid_upload_keeps_the_committed_bytes_and_resumes() {
    let Some(vol) = Volume::require(Fs::Ext2, 256) else {
        return;
    };
    let m = start(&vol, CONFIG);
    let mut c = client(&m);
    let data = payload(BIG, 30);
    let name = write_name(&digest(&data));
    let mut w = OpenWrite::start(&c, &name, &data, 0);
    w.send(32 * CHUNK).await;
    wait_for_committed(&mut c, &name, |n| n >= 32 * MIB as i64).await;

    let filler = vol.fill();
    let status = expect_code(
        w.finish().await,
        Code::ResourceExhausted,
        "the upload on a full disk",
    );
    let committed = resume_offset(status.message());
    assert!(
        status.message().contains("disk full"),
        "{}",
        status.message()
    );
    assert!(
        (32 * MIB..BIG as u64).contains(&committed),
        "committed {committed}"
    );
    // Exactly what it reported is kept: QueryWriteStatus and the file agree.
    assert_eq!(
        query(&mut c, &name).await.unwrap(),
        (committed as i64, false)
    );
    let part = partials(&vol.path);
    assert_eq!(part.len(), 1, "{part:?}");
    assert_eq!(std::fs::metadata(&part[0]).unwrap().len(), committed);

    // Resuming at another offset is the usual error; on a still-full disk the
    // right offset is refused up front; neither changes the partial.
    let wrong = expect_code(
        write_from(&mut c, &name, &data, committed + 1).await,
        Code::InvalidArgument,
        "a resume at the wrong offset",
    );
    assert!(
        wrong.message().contains(&format!("expected {committed}")),
        "{}",
        wrong.message()
    );
    expect_code(
        write_from(&mut c, &name, &data, committed).await,
        Code::ResourceExhausted,
        "a resume while the disk is full",
    );
    assert_eq!(
        query(&mut c, &name).await.unwrap(),
        (committed as i64, false)
    );

    std::fs::remove_file(filler).unwrap();
    assert_eq!(
        write_from(&mut c, &name, &data, committed)
            .await
            .expect("the resume"),
        BIG as i64
    );
    let d = digest(&data);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.unwrap(), d);
    assert!(partials(&vol.path).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_io_error_mid_upload_keeps_the_committed_bytes_and_resumes() {
    // A file-size limit makes the kernel fail the write past it with EFBIG,
    // an I/O error that is not a full disk. SIGXFSZ is ignored (inherited
    // through exec), as a server must, so the write fails instead of killing it.
    let limit: u64 = 24 * MIB;
    let launcher = ["bash", "-c", "trap '' XFSZ; exec \"$@\"", "launcher"];
    let m = Memgate::start_launched(tempfile::tempdir().unwrap(), "", &[], &launcher);
    let pid = m.pid().to_string();
    // The soft limit only, so that lifting it needs no privilege.
    let soft = |value: &str| {
        run(
            "prlimit",
            &[
                "--pid".as_ref(),
                pid.as_ref(),
                format!("--fsize={value}:unlimited").as_ref(),
            ],
        )
        .unwrap()
    };
    soft(&limit.to_string());
    let mut c = client(&m);
    let data = payload(64 * MIB as usize, 40);
    let name = write_name(&digest(&data));
    let status = expect_code(
        write_from(&mut c, &name, &data, 0).await,
        Code::Internal,
        "an upload past the file-size limit",
    );
    assert!(
        status.message().contains(&format!(
            "the first {limit} bytes of the upload are committed"
        )),
        "{}",
        status.message()
    );
    assert_eq!(query(&mut c, &name).await.unwrap(), (limit as i64, false));
    soft("unlimited");
    assert_eq!(
        write_from(&mut c, &name, &data, limit)
            .await
            .expect("the resume"),
        data.len() as i64
    );
    let d = digest(&data);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.unwrap(), d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partials_from_before_preallocation_and_stale_preallocations_resume() {
    let Some(vol) = Volume::require(Fs::Tmpfs, 220) else {
        return;
    };
    let uploads = vol.path.join("uploads");
    std::fs::create_dir_all(&uploads).unwrap();
    // Partial files as an earlier memgate left them, named by upload, their
    // length the committed size: one plain (a version before preallocation),
    // one with a preallocation to its full size left past its end (a crash).
    let plain = payload(32 * MIB as usize, 50);
    let stale = payload(BIG, 51);
    let (plain_d, stale_d) = (digest(&plain), digest(&stale));
    let part = |uuid: &str, d: &memgate::api::resource::Digest| {
        uploads.join(format!("+{uuid}+{}+{}.part", d.hex(), d.size))
    };
    std::fs::write(part("plain", &plain_d), &plain[..8 * MIB as usize]).unwrap();
    let stale_path = part("stale", &stale_d);
    std::fs::write(&stale_path, &stale[..16 * MIB as usize]).unwrap();
    run(
        "fallocate",
        &[
            "-n".as_ref(),
            "-l".as_ref(),
            BIG.to_string().as_ref(),
            stale_path.as_os_str(),
        ],
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&stale_path).unwrap().len(), 16 * MIB);

    // A floor of 1 MiB: 68 MiB are free, less than the stale upload's 127 MiB
    // still to write, unless its own stale preallocation is counted as its own.
    let m = start(&vol, "[storage]\nmin_free_space = \"1MiB\"\n");
    let mut c = client(&m);
    let stale_name = write_name_with("stale", &stale_d);
    assert_eq!(
        query(&mut c, &stale_name).await.unwrap(),
        (16 * MIB as i64, false)
    );
    assert_eq!(
        write_from(&mut c, &stale_name, &stale, 16 * MIB)
            .await
            .expect("resume over a stale preallocation"),
        BIG as i64
    );
    assert_eq!(
        read_digest(&mut c, &stale_d.read_name()).await.unwrap(),
        stale_d
    );

    let plain_name = write_name_with("plain", &plain_d);
    assert_eq!(
        query(&mut c, &plain_name).await.unwrap(),
        (8 * MIB as i64, false)
    );
    assert_eq!(
        write_from(&mut c, &plain_name, &plain, 8 * MIB)
            .await
            .expect("resume of a partial from before preallocation"),
        plain.len() as i64
    );
    assert_eq!(
        read_digest(&mut c, &plain_d.read_name()).await.unwrap(),
        plain_d
    );
    // Blobs hold their data and nothing more.
    let blob = vol
        .path
        .join("blobs")
        .join(&stale_d.hex()[..2])
        .join(stale_d.hex());
    let allocated = std::fs::metadata(blob).unwrap().blocks() * 512;
    assert!(
        allocated < BIG as u64 + MIB,
        "the blob holds {allocated} bytes of blocks"
    );
    assert_eq!(disk_metric(&m, "reserved").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_reports_the_data_volume() {
    let Some(vol) = Volume::require(Fs::Tmpfs, 220) else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_memgate"))
        .args(["limits", "--json"])
        .env("MEMGATE__STORAGE__DATA_DIR", &vol.path)
        .env("MEMGATE__STORAGE__MIN_FREE_SPACE", "100MiB")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (free, capacity) = vol.statvfs();
    assert_eq!(r["disk_capacity_bytes"], capacity);
    assert_eq!(capacity, 220 * MIB);
    assert_eq!(r["disk_free_bytes"], free);
    assert_eq!(r["disk_min_free_bytes"], 100 * MIB);
    assert_eq!(r["disk_admittable_bytes"], free - 100 * MIB);
    let text = Command::new(env!("CARGO_BIN_EXE_memgate"))
        .arg("limits")
        .env("MEMGATE__STORAGE__DATA_DIR", &vol.path)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("220.0 MiB free of 220.0 MiB; uploads up to 156.0 MiB admitted (storage.min_free_space 64.0 MiB)"),
        "{text}"
    );
}
