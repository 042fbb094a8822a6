//! Keeps blob data out of the page cache behind us. Page cache is charged to the
//! container's memory cgroup, and active file pages count in the working set the
//! kubelet evicts on; a server that streams gigabytes through disk would otherwise
//! fill its own limit with cache. This is RocksDB's `bytes_per_sync` idea: start
//! writeback of each window as it fills, wait for the one before, then drop it.

use std::{fs::File, os::fd::AsRawFd};

/// Writeback and drop granularity.
pub const WINDOW: u64 = 8 * 1024 * 1024;

/// Starts asynchronous writeback of `[offset, offset + len)`.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on a valid open descriptor; failure only loses an optimisation.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Waits for writeback of `[offset, offset + len)` and drops those pages from the cache.
pub fn settle_and_drop(file: &File, offset: u64, len: u64) {
    // SAFETY: as above.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
    }
    drop_cache(file, offset, len);
}

/// Drops clean pages of `[offset, offset + len)` (len 0 = to the end) from the cache.
pub fn drop_cache(file: &File, offset: u64, len: u64) {
    // SAFETY: as above; fadvise is advisory.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}
