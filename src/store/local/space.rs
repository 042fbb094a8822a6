//! The local store's disk budget. An upload is admitted only when what it still
//! has to write fits the free space above `storage.min_free_space` (the blob's
//! size is in its resource name, so this is known before the first byte), and
//! that space is then taken at once with `fallocate(FALLOC_FL_KEEP_SIZE)`: no
//! other writer on the volume, another upload or anything else, can make it run
//! out halfway. `KEEP_SIZE` leaves the file's length at the bytes written, which
//! is what `QueryWriteStatus` reports and a resume re-hashes, so partial files
//! keep their format.
//!
//! Where the filesystem cannot preallocate (ext2/ext3, some network and FUSE
//! filesystems), the reservation is only counted here: uploads in progress still
//! see each other's outstanding bytes, but a writer outside memgate can fill the
//! disk, and the writer then ends the upload with what it committed
//! ([`super::super::writer`] handles that).
//!
//! A [`Reservation`] gives back what was not written when it drops: the counters
//! here, and the preallocated blocks past the end of the file. It does not own
//! the upload's file or lock; the writer thread does.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use rustix::{fs::FallocateFlags, io::Errno};
use serde::Serialize;

use crate::store::StoreError;

/// Free space and what uploads in progress hold of it, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpaceReading {
    /// Bytes an unprivileged writer may still use on the data directory's
    /// filesystem (`f_bavail`; blocks reserved for root are not counted).
    pub free: u64,
    /// Size of that filesystem.
    pub capacity: u64,
    /// `storage.min_free_space`: what uploads must leave free.
    pub floor: u64,
    /// Bytes promised to uploads in progress and not yet written.
    pub reserved: u64,
    /// The part of `reserved` that could not be preallocated, so is still
    /// counted in `free`.
    pub unbacked: u64,
}

impl SpaceReading {
    /// The largest upload (bytes still to write) admitted now.
    pub fn admittable(&self) -> u64 {
        self.free
            .saturating_sub(self.floor)
            .saturating_sub(self.unbacked)
    }

    /// Admits an upload that still has to write `need` bytes, or says why not.
    pub fn admit(&self, need: u64) -> Result<(), StoreError> {
        if need > self.admittable() {
            return Err(StoreError::NoSpace {
                need,
                available: self.admittable(),
                free: self.free,
                floor: self.floor,
                reserved: self.reserved,
            });
        }
        Ok(())
    }
}

/// Whether an I/O error means the disk (or the quota) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::NOSPC | Errno::DQUOT)
    )
}

/// `statvfs` of `dir`: (free for unprivileged writers, capacity), in bytes.
pub fn statvfs(dir: &Path) -> io::Result<(u64, u64)> {
    let s = rustix::fs::statvfs(dir)?;
    Ok((
        s.f_bavail.saturating_mul(s.f_frsize),
        s.f_blocks.saturating_mul(s.f_frsize),
    ))
}

/// The disk budget of one data directory. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct DiskSpace {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    floor: u64,
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    reserved: u64,
    unbacked: u64,
}

impl DiskSpace {
    /// The budget of the filesystem holding `dir`, keeping `floor` bytes free.
    pub fn new(dir: PathBuf, floor: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                dir,
                floor,
                counters: Mutex::default(),
            }),
        }
    }

    /// Reads the filesystem now (for metrics and `memgate limits`).
    pub fn reading(&self) -> io::Result<SpaceReading> {
        let counters = self.shared.lock();
        self.shared.read(&counters)
    }

    /// Reserves room for the `[committed, declared)` bytes an upload still has
    /// to write into `file`: checks them against the free space above the
    /// floor, then preallocates them. Checks and preallocations of concurrent
    /// uploads happen one at a time, so two cannot both take the last space.
    pub fn reserve(
        &self,
        file: &File,
        committed: u64,
        declared: u64,
    ) -> Result<Reservation, StoreError> {
        let need = declared.saturating_sub(committed);
        let mut reservation = Reservation {
            shared: self.shared.clone(),
            file: None,
            end: declared,
            remaining: 0,
            backed: true,
        };
        if need == 0 {
            return Ok(reservation);
        }
        let mut counters = self.shared.lock();
        // An earlier stream that did not end cleanly (a crash) may have left its
        // preallocation past the end: give it back first, or it would count twice.
        if let Err(e) = release_past_end(file, committed, declared) {
            tracing::warn!(error = %e, "releasing a stale preallocation failed");
        }
        let reading = self
            .shared
            .read(&counters)
            .map_err(StoreError::io("reading free disk space"))?;
        reading.admit(need)?;
        match rustix::fs::fallocate(file, FallocateFlags::KEEP_SIZE, committed, need) {
            Ok(()) => {}
            // The filesystem cannot preallocate: count the bytes instead.
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                reservation.backed = false;
                counters.unbacked += need;
            }
            // The check passed but the filesystem disagrees (a quota, or the
            // blocks its own metadata needs): refused all the same.
            Err(Errno::NOSPC | Errno::DQUOT) => {
                return Err(StoreError::NoSpace {
                    need,
                    available: reading.admittable().min(need.saturating_sub(1)),
                    free: reading.free,
                    floor: reading.floor,
                    reserved: reading.reserved,
                });
            }
            Err(e) => return Err(StoreError::io("preallocating the upload")(e.into())),
        }
        counters.reserved += need;
        drop(counters);
        reservation.remaining = need;
        if reservation.backed {
            // A handle of its own, so dropping the reservation can release the
            // blocks whatever happened to the writer's file.
            reservation.file = file.try_clone().ok();
        }
        Ok(reservation)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self, counters: &Counters) -> io::Result<SpaceReading> {
        let (free, capacity) = statvfs(&self.dir)?;
        Ok(SpaceReading {
            free,
            capacity,
            floor: self.floor,
            reserved: counters.reserved,
            unbacked: counters.unbacked,
        })
    }
}

/// Releases the blocks preallocated past the end of `file` (whose length is
/// `len`), up to `end`, leaving its length alone. Filesystems differ in which
/// call does it: tmpfs and XFS punch a hole past the end, ext4 ignores a punch
/// there but drops preallocated blocks on a truncate to the same length. Both
/// are harmless where the other one works.
fn release_past_end(file: &File, len: u64, end: u64) -> io::Result<()> {
    if end > len {
        match rustix::fs::fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            len,
            end - len,
        ) {
            Ok(()) | Err(Errno::OPNOTSUPP | Errno::NOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    file.set_len(len)
}

/// Room an upload holds for the bytes it has not written yet. Dropping it gives
/// back the rest.
pub struct Reservation {
    shared: Arc<Shared>,
    /// A duplicate of the upload's file when its space was preallocated.
    file: Option<File>,
    /// The declared size: the preallocation ends here.
    end: u64,
    remaining: u64,
    backed: bool,
}

impl Reservation {
    /// `n` more bytes reached the file.
    pub fn wrote(&mut self, n: u64) {
        let n = n.min(self.remaining);
        if n == 0 {
            return;
        }
        self.remaining -= n;
        let mut c = self.shared.lock();
        c.reserved -= n;
        if !self.backed {
            c.unbacked -= n;
        }
    }

    /// Bytes still reserved.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.remaining == 0 {
            return;
        }
        {
            let mut c = self.shared.lock();
            c.reserved -= self.remaining;
            if !self.backed {
                c.unbacked -= self.remaining;
            }
        }
        // The blocks past what was written go back to the filesystem. The
        // writer has stopped by now, so the length is final.
        if let Some(file) = &self.file
            && let Ok(meta) = file.metadata()
            && let Err(e) = release_past_end(file, meta.len(), self.end)
        {
            tracing::warn!(error = %e, "releasing an upload's preallocated space failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(free: u64, floor: u64, unbacked: u64) -> SpaceReading {
        SpaceReading {
            free,
            capacity: 1 << 30,
            floor,
            reserved: unbacked,
            unbacked,
        }
    }

    #[test]
    fn admission_leaves_the_floor_and_counts_what_is_not_preallocated() {
        let mib = 1 << 20;
        // (free, floor, unbacked, need, admitted)
        for (free, floor, unbacked, need, ok) in [
            (100 * mib, 64 * mib, 0, 36 * mib, true),
            (100 * mib, 64 * mib, 0, 36 * mib + 1, false),
            (100 * mib, 0, 0, 100 * mib, true),
            (100 * mib, 0, 10 * mib, 91 * mib, false),
            (100 * mib, 0, 10 * mib, 90 * mib, true),
            // Below the floor already: only empty uploads pass.
            (10 * mib, 64 * mib, 0, 1, false),
            (10 * mib, 64 * mib, 0, 0, true),
            (0, 0, 0, 0, true),
        ] {
            let r = reading(free, floor, unbacked);
            assert_eq!(
                r.admit(need).is_ok(),
                ok,
                "{free} {floor} {unbacked} {need}"
            );
        }
    }

    #[test]
    fn the_refusal_names_both_numbers_and_the_key() {
        let mib = 1 << 20;
        let e = reading(77 * mib, 64 * mib, 0).admit(143 * mib).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("143 MiB") && msg.contains("13 MiB"), "{msg}");
        assert!(msg.contains("storage.min_free_space"), "{msg}");
        assert!(
            matches!(e, StoreError::NoSpace { need, available, .. } if need == 143 * mib && available == 13 * mib)
        );
    }

    #[test]
    fn disk_full_errors_are_recognised() {
        for (errno, full) in [
            (libc::ENOSPC, true),
            (libc::EDQUOT, true),
            (libc::EIO, false),
            (libc::EFBIG, false),
        ] {
            assert_eq!(
                is_disk_full(&io::Error::from_raw_os_error(errno)),
                full,
                "{errno}"
            );
        }
        assert!(!is_disk_full(&io::Error::other("not an OS error")));
    }

    #[test]
    fn a_reservation_preallocates_and_gives_back_what_was_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let space = DiskSpace::new(dir.path().to_path_buf(), 0);
        let path = dir.path().join("u.part");
        let file = File::create(&path).unwrap();
        let mut r = space.reserve(&file, 0, 8 << 20).unwrap();
        assert_eq!(space.reading().unwrap().reserved, 8 << 20);
        // KEEP_SIZE: the length stays what was written.
        assert_eq!(file.metadata().unwrap().len(), 0);
        r.wrote(3 << 20);
        assert_eq!(r.remaining(), 5 << 20);
        assert_eq!(space.reading().unwrap().reserved, 5 << 20);
        drop(r);
        let after = space.reading().unwrap();
        assert_eq!((after.reserved, after.unbacked), (0, 0));
        if let Ok(m) = std::fs::metadata(&path) {
            use std::os::unix::fs::MetadataExt;
            // Nothing was written, and nothing stays allocated past the end.
            assert_eq!(m.len(), 0);
            assert_eq!(m.blocks(), 0, "preallocated blocks were not released");
        }
    }
}
