//! The blocking half of an upload: a thread from tokio's blocking pool that owns
//! the partial file and the upload's lock, hashes and writes each chunk, keeps
//! page cache bounded, and on `Finish` verifies and commits. The async half
//! ([`super::Upload`]) feeds it through a channel of a few chunks, which is what
//! bounds an upload's memory. Because the lock lives here, a new stream for the
//! same upload cannot start until this one has fsynced what it received.
//!
//! When the disk fails (full, a quota, an I/O error), the thread stops, makes
//! what reached the file durable and reports how much that is: those bytes stay
//! the upload's committed state, resumable like after a disconnect. The upload's
//! disk reservation goes back when the thread ends, however it ends.

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
    local::Reservation,
    upload::{Cmd, UploadLock},
};
use crate::api::resource::Digest;

/// Everything the thread needs to commit. Fields drop in order: the disk
/// reservation goes back before the lock, so a new stream for the same upload
/// never preallocates before this one has released.
pub(super) struct Target {
    pub expected: Digest,
    pub partial: PathBuf,
    pub blob: PathBuf,
    pub space: Reservation,
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

/// Chunks queued for the hashing thread: none, a hand-over. Hashing (about
/// 1 GB/s with SHA-NI) and writing still run side by side on the same chunk,
/// but the hasher, slower than a page-cache write, can no longer fall chunks
/// behind and keep them alive: the writer holds at most the chunk being hashed
/// and the next one, which is what the guard reserves for.
const HASH_QUEUE: usize = 0;

/// Runs until a `Finish` arrives or the channel closes (client gone: fsync and keep
/// the partial data for resume). Hashing runs on a second thread beside the writes.
pub(super) fn run(
    file: File,
    hasher: Sha256,
    written: u64,
    mut target: Target,
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
        write_loop(file, written, &mut target, rx, to_hasher, move || {
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
    target: &mut Target,
    mut rx: mpsc::Receiver<Cmd>,
    to_hasher: std::sync::mpsc::SyncSender<Bytes>,
    finish_hash: impl FnOnce() -> [u8; 32],
) -> Result<u64, StoreError> {
    // Held, not used: the lock lives as long as this thread owns the file.
    let _lock = &target.lock;
    let mut synced_to = written - written % cache::WINDOW;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Cmd::Data(data) => {
                // The hashing thread only stops when this sender goes.
                let _ = to_hasher.send(data.clone());
                if let Err(e) = file.write_all(&data) {
                    return Err(keep_committed(&file, written, "writing partial upload", e));
                }
                written += data.len() as u64;
                target.space.wrote(data.len() as u64);
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
        .map_err(StoreError::write_failed("syncing partial upload", written))?;
    cache::drop_cache(&file, 0, 0);
    Ok(written)
}

/// A write failed with `written` bytes acknowledged before it: makes what is
/// in the file durable and returns the error, saying how much is kept. What a
/// failed `write(2)` stored is a prefix of the chunk, so the file is still a
/// prefix of the upload and its length stays the committed size (and
/// `QueryWriteStatus` never goes backwards). If even the sync fails, only the
/// bytes acknowledged before this chunk are claimed: anything after them is cut.
fn keep_committed(file: &File, written: u64, context: &str, e: std::io::Error) -> StoreError {
    let committed = match file.sync_all() {
        Ok(()) => file.metadata().map_or(written, |m| m.len()),
        Err(sync) => {
            tracing::error!(error = %sync, "syncing a failed upload failed too");
            let _ = file.set_len(written);
            written
        }
    };
    cache::drop_cache(file, 0, 0);
    tracing::warn!(error = %e, committed, "upload stopped by a disk error; its committed bytes are kept");
    StoreError::write_failed(context, committed)(e)
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
    // From here the partial holds the whole verified blob: a disk error keeps it,
    // and a Write at write_offset = size with finish_write commits it later.
    let kept = |context: String| StoreError::write_failed(context, size);
    file.sync_all().map_err(kept("syncing upload".into()))?;
    cache::drop_cache(file, 0, 0);
    let dir = target
        .blob
        .parent()
        .expect("blob paths have a shard directory");
    std::fs::create_dir_all(dir).map_err(kept(format!("creating {}", dir.display())))?;
    // rename is atomic: readers see no blob or the whole blob. A concurrent commit of
    // the same content replaces identical bytes.
    std::fs::rename(&target.partial, &target.blob)
        .map_err(kept(format!("committing {}", target.blob.display())))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(format!("syncing {}", dir.display())))?;
    Ok(size)
}
