//! The blocking half of an upload: a thread from tokio's blocking pool that owns
//! the partial file and the upload's lock, hashes and writes each chunk, keeps
//! page cache bounded, and on `Finish` verifies and commits. The async half
//! ([`super::Upload`]) feeds it through a channel of a few chunks, which is what
//! bounds an upload's memory. Because the lock lives here, a new stream for the
//! same upload cannot start until this one has fsynced what it received.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    path::PathBuf,
};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::{
    StoreError, cache,
    upload::{Cmd, UploadLock},
};
use crate::api::resource::Digest;

/// Everything the thread needs to commit.
pub(super) struct Target {
    pub expected: Digest,
    pub partial: PathBuf,
    pub blob: PathBuf,
    pub lock: UploadLock,
}

/// Hashes the `len` bytes already in `file` (a resumed upload), leaving the cursor at the end.
pub(super) fn rehash(file: &mut File, len: u64) -> std::io::Result<Sha256> {
    let mut hasher = Sha256::new();
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "partial upload shrank while resuming",
            ));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    cache::drop_cache(file, 0, 0);
    file.seek(SeekFrom::Start(len))?;
    Ok(hasher)
}

/// Chunks queued for the hashing thread. Hashing (about 1 GB/s with SHA-NI) and
/// writing run side by side; two chunks keep both busy and bound the memory.
const HASH_QUEUE: usize = 2;

/// Runs until a `Finish` arrives or the channel closes (client gone: fsync and keep
/// the partial data for resume). Hashing runs on a second thread beside the writes.
pub(super) fn run(
    file: File,
    hasher: Sha256,
    written: u64,
    target: Target,
    rx: mpsc::Receiver<Cmd>,
) -> Result<u64, StoreError> {
    let (to_hasher, chunks) = std::sync::mpsc::sync_channel::<Bytes>(HASH_QUEUE);
    std::thread::scope(|scope| {
        let hashing = scope.spawn(move || {
            let mut hasher = hasher;
            for chunk in chunks {
                hasher.update(&chunk);
            }
            hasher
        });
        write_loop(file, written, &target, rx, to_hasher, move || {
            hashing
                .join()
                .expect("hashing thread panicked")
                .finalize()
                .into()
        })
    })
}

fn write_loop(
    mut file: File,
    mut written: u64,
    target: &Target,
    mut rx: mpsc::Receiver<Cmd>,
    to_hasher: std::sync::mpsc::SyncSender<Bytes>,
    finish_hash: impl FnOnce() -> [u8; 32],
) -> Result<u64, StoreError> {
    let _lock = &target.lock;
    let mut synced_to = written - written % cache::WINDOW;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Cmd::Data(data) => {
                // The hashing thread only stops when this sender goes.
                let _ = to_hasher.send(data.clone());
                file.write_all(&data)
                    .map_err(StoreError::io("writing partial upload"))?;
                written += data.len() as u64;
                // Write-behind: start writeback of each full window, settle the one before.
                while written - synced_to >= cache::WINDOW {
                    cache::start_writeback(&file, synced_to, cache::WINDOW);
                    if synced_to >= cache::WINDOW {
                        cache::settle_and_drop(&file, synced_to - cache::WINDOW, cache::WINDOW);
                    }
                    synced_to += cache::WINDOW;
                }
            }
            Cmd::Finish(reply) => {
                drop(to_hasher);
                let result = commit(&file, target, finish_hash(), written);
                let _ = reply.send(result);
                return Ok(written);
            }
        }
    }
    file.sync_all()
        .map_err(StoreError::io("syncing partial upload"))?;
    cache::drop_cache(&file, 0, 0);
    Ok(written)
}

fn commit(file: &File, target: &Target, hash: [u8; 32], size: u64) -> Result<u64, StoreError> {
    let expected = target.expected;
    if hash != expected.hash || size != expected.size {
        // Nothing is committed; the partial data is useless and goes.
        let _ = std::fs::remove_file(&target.partial);
        return Err(StoreError::DigestMismatch {
            expected,
            actual_hash: hex::encode(hash),
            actual_size: size,
        });
    }
    file.sync_all().map_err(StoreError::io("syncing upload"))?;
    cache::drop_cache(file, 0, 0);
    let dir = target
        .blob
        .parent()
        .expect("blob paths have a shard directory");
    std::fs::create_dir_all(dir).map_err(StoreError::io(format!("creating {}", dir.display())))?;
    // rename is atomic: readers see no blob or the whole blob. A concurrent commit of
    // the same content replaces identical bytes.
    std::fs::rename(&target.partial, &target.blob).map_err(StoreError::io(format!(
        "committing {}",
        target.blob.display()
    )))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(format!("syncing {}", dir.display())))?;
    Ok(size)
}
