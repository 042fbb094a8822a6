//! The allocator's side of the guard: jemalloc's statistics, the options in
//! force, and the purge that hands freed pages back to the OS. The only module
//! with `unsafe`, because jemalloc's control interface is C.
//!
//! It never installs jemalloc: the binary's `#[global_allocator]` does. When the
//! binary uses another allocator these calls still work but describe an idle
//! jemalloc; [`is_global_allocator`] tells the two apart, and the guard then
//! runs its purger in disabled mode. Off Linux jemalloc is not linked and every
//! call returns [`JemallocError::Unsupported`].

/// The options memgate's binary embeds as jemalloc's `_rjem_malloc_conf`
/// (the `_RJEM_MALLOC_CONF` environment variable still overrides them).
///
/// Measured with `cargo run --release --example jemalloc_decay -- --all`: one
/// request's 150 MB decode buffer plus 150 MB in 3 MB chunks, freed on a worker
/// thread that stays alive; jemalloc `stats.resident` 0 s / 1 s / 5 s after the
/// free (VmRSS agrees within a few MB), three runs, 2 cores:
///
/// | options | no purge | after `purge_all` |
/// |---|---|---|
/// | defaults | 57 / 57 / 57 MB | 3–5 MB; purge 4–7 ms |
/// | `dirty_decay_ms:1000,muzzy_decay_ms:0` | 57 / 57 / 57 MB | 3–5 MB; purge 4–8 ms |
/// | `background_thread:true` | 313 / 313 / 313 MB | 3–5 MB; purge 22–42 ms |
/// | this | 311 / 160 / 3–5 MB | 3–5 MB; purge 23–30 ms (one 100 ms outlier) |
///
/// A purge that finds nothing dirty takes 4–8 µs. Defaults hand the ≥ 8 MiB
/// decode buffer back at once, but smaller freed pages stay until the next
/// allocations advance decay, so an idle server keeps them for good (57 MB
/// here); without background threads a shorter decay changes nothing. With
/// background threads and the default 10 s decay, the whole 300 MB stays past
/// 5 s. This setting is the one that gets back to baseline within seconds on
/// its own, which matters whenever the guard does not purge: requests under
/// `purge_threshold`, purges deferred by `purge_min_interval`, or a failing
/// purge. `muzzy_decay_ms:0` is jemalloc 5.3's default, stated so that lazily
/// freed pages (which still count against the cgroup) cannot linger.
///
/// The binary exports it like this (a doc test, in its own binary, checks that
/// jemalloc takes it):
///
/// ```standalone_crate
/// # #[cfg(target_os = "linux")] {
/// use memgate::guard::jemalloc::{self, EMBEDDED_MALLOC_CONF_C};
///
/// #[global_allocator]
/// static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
///
/// #[unsafe(no_mangle)]
/// pub static _rjem_malloc_conf: Option<&'static std::ffi::c_char> =
///     // SAFETY: the first byte of a NUL-terminated string that lives forever.
///     Some(unsafe { &*EMBEDDED_MALLOC_CONF_C.as_ptr() });
///
/// let s = jemalloc::settings().unwrap();
/// assert_eq!(s.embedded_malloc_conf.as_deref(), Some(jemalloc::EMBEDDED_MALLOC_CONF));
/// if s.env_malloc_conf.is_none() {
///     assert!(s.background_thread);
///     assert_eq!((s.dirty_decay_ms, s.muzzy_decay_ms), (1000, 0));
/// }
/// # }
/// ```
pub const EMBEDDED_MALLOC_CONF: &str = match EMBEDDED_MALLOC_CONF_C.to_str() {
    Ok(conf) => conf,
    Err(_) => panic!("jemalloc options are ASCII"),
};

/// [`EMBEDDED_MALLOC_CONF`] as the C string jemalloc reads.
pub const EMBEDDED_MALLOC_CONF_C: &std::ffi::CStr =
    c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0";

/// jemalloc's byte counters, read together after advancing the stats epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocStats {
    /// Bytes in live allocations.
    pub allocated: u64,
    /// Bytes in active pages: `allocated` plus fragmentation within them.
    pub active: u64,
    /// Bytes in physically resident pages: active, metadata, and freed pages
    /// not yet returned to the OS. What a purge lowers.
    pub resident: u64,
    /// Bytes in active extents mapped by the allocator.
    pub mapped: u64,
    /// Virtual memory kept mapped but returned to the OS (not resident).
    pub retained: u64,
}

/// jemalloc's options in force, for `memgate limits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JemallocSettings {
    pub version: &'static str,
    /// `opt.background_thread`: what start-up asked for.
    pub opt_background_thread: bool,
    /// `background_thread`: whether background purging threads run now.
    pub background_thread: bool,
    /// `opt.dirty_decay_ms`: how long freed pages stay resident (-1: forever).
    pub dirty_decay_ms: i64,
    /// `opt.muzzy_decay_ms`: how long purged-lazily pages stay mapped.
    pub muzzy_decay_ms: i64,
    pub narenas: u32,
    /// `opt.oversize_threshold`: allocations this big get the dedicated
    /// arena that purges at once unless background threads are on.
    pub oversize_threshold: u64,
    /// `config.malloc_conf`: options built into the library (`--with-malloc-conf`).
    pub built_in_malloc_conf: String,
    /// The binary's `_rjem_malloc_conf`, if it exports one.
    pub embedded_malloc_conf: Option<String>,
    /// `_RJEM_MALLOC_CONF` from the environment, which overrides the others.
    pub env_malloc_conf: Option<String>,
}

/// A jemalloc control call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JemallocError {
    #[error("mallctl {name} failed with {}", errno_name(*.errno))]
    Mallctl { name: &'static str, errno: i32 },
    #[error("mallctl {name} failed: {reason}")]
    Ctl { name: &'static str, reason: String },
    #[error("jemalloc is only linked on Linux")]
    Unsupported,
}

fn errno_name(errno: i32) -> String {
    match errno {
        libc::EINVAL => "EINVAL".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::EPERM => "EPERM".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ENOMEM => "ENOMEM".into(),
        n => format!("errno {n}"),
    }
}

#[cfg(target_os = "linux")]
fn ctl<T>(name: &'static str, r: Result<T, tikv_jemalloc_ctl::Error>) -> Result<T, JemallocError> {
    r.map_err(|e| JemallocError::Ctl {
        name,
        reason: e.to_string(),
    })
}

/// Reads the byte counters, advancing the epoch first so they are current.
#[cfg(target_os = "linux")]
pub fn stats() -> Result<AllocStats, JemallocError> {
    use tikv_jemalloc_ctl::{epoch, stats};
    ctl("epoch", epoch::advance())?;
    Ok(AllocStats {
        allocated: ctl("stats.allocated", stats::allocated::read())? as u64,
        active: ctl("stats.active", stats::active::read())? as u64,
        resident: ctl("stats.resident", stats::resident::read())? as u64,
        mapped: ctl("stats.mapped", stats::mapped::read())? as u64,
        retained: ctl("stats.retained", stats::retained::read())? as u64,
    })
}

/// Returns every arena's unused dirty and muzzy pages to the OS now.
///
/// Goes through `mallctl` directly: `tikv_jemalloc_ctl::raw::write` and
/// `update` answer EPERM for this void key and purge nothing.
#[cfg(target_os = "linux")]
pub fn purge_all() -> Result<(), JemallocError> {
    // 4096 is MALLCTL_ARENAS_ALL, which jemalloc does not export as a symbol.
    const NAME: &std::ffi::CStr = c"arena.4096.purge";
    // SAFETY: NAME is NUL-terminated; `arena.<i>.purge` neither reads nor writes
    // a value, so null old/new pointers and a zero length are what it expects.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            NAME.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    match rc {
        0 => Ok(()),
        errno => Err(JemallocError::Mallctl {
            name: "arena.4096.purge",
            errno,
        }),
    }
}

/// Whether jemalloc serves this process's Rust allocations: a fresh allocation
/// must show up in this thread's jemalloc byte counter. Probed once (the global
/// allocator cannot change), so it is cheap to call on every sample.
#[cfg(target_os = "linux")]
pub fn is_global_allocator() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(probe_global_allocator)
}

#[cfg(target_os = "linux")]
fn probe_global_allocator() -> bool {
    let Ok(counter) = tikv_jemalloc_ctl::thread::allocatedp::read() else {
        return false;
    };
    let before = counter.get();
    let probe = std::hint::black_box(Vec::<u8>::with_capacity(64 * 1024));
    let after = counter.get();
    drop(probe);
    after.saturating_sub(before) >= 64 * 1024
}

/// The options in force and where they could have come from.
#[cfg(target_os = "linux")]
pub fn settings() -> Result<JemallocSettings, JemallocError> {
    use tikv_jemalloc_ctl::{background_thread, config, opt, raw, version};
    // SAFETY: both keys are `ssize_t` in jemalloc 5.3's mallctl namespace, so
    // reading them as `isize` matches the size jemalloc copies out.
    let (dirty, muzzy) = unsafe {
        (
            raw::read::<isize>(b"opt.dirty_decay_ms\0"),
            raw::read::<isize>(b"opt.muzzy_decay_ms\0"),
        )
    };
    // SAFETY: `opt.oversize_threshold` is a `size_t`, which is `usize`.
    let oversize = unsafe { raw::read::<usize>(b"opt.oversize_threshold\0") };
    Ok(JemallocSettings {
        // tikv-jemalloc-ctl 0.7 leaves the C string's NUL on its `&str` values.
        version: ctl("version", version::read())?.trim_end_matches('\0'),
        opt_background_thread: ctl("opt.background_thread", opt::background_thread::read())?,
        background_thread: ctl("background_thread", background_thread::read())?,
        dirty_decay_ms: ctl("opt.dirty_decay_ms", dirty)? as i64,
        muzzy_decay_ms: ctl("opt.muzzy_decay_ms", muzzy)? as i64,
        narenas: ctl("opt.narenas", opt::narenas::read())?,
        oversize_threshold: ctl("opt.oversize_threshold", oversize)? as u64,
        built_in_malloc_conf: ctl("config.malloc_conf", config::malloc_conf::read())?
            .trim_end_matches('\0')
            .to_owned(),
        embedded_malloc_conf: embedded_malloc_conf(),
        env_malloc_conf: std::env::var("_RJEM_MALLOC_CONF").ok(),
    })
}

#[cfg(target_os = "linux")]
fn embedded_malloc_conf() -> Option<String> {
    // SAFETY: `_rjem_malloc_conf` is jemalloc's weak null pointer unless the
    // binary defines it; jemalloc reads it as a NUL-terminated 'static string at
    // start-up, so a non-null value is one, and nothing writes it afterwards.
    let conf = unsafe { tikv_jemalloc_sys::malloc_conf }?;
    // SAFETY: as above, a NUL-terminated string that lives for the whole program.
    let conf = unsafe { std::ffi::CStr::from_ptr(conf) };
    Some(conf.to_string_lossy().into_owned())
}

#[cfg(not(target_os = "linux"))]
pub fn stats() -> Result<AllocStats, JemallocError> {
    Err(JemallocError::Unsupported)
}

#[cfg(not(target_os = "linux"))]
pub fn purge_all() -> Result<(), JemallocError> {
    Err(JemallocError::Unsupported)
}

#[cfg(not(target_os = "linux"))]
pub fn is_global_allocator() -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub fn settings() -> Result<JemallocSettings, JemallocError> {
    Err(JemallocError::Unsupported)
}

#[cfg(all(test, target_os = "linux"))]
pub(super) mod tests {
    use std::sync::Mutex;

    use super::*;

    // Only this crate's unit-test binary: the library never installs jemalloc.
    #[global_allocator]
    static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    /// The counters are process-wide: tests that measure them must not overlap
    /// under `cargo test` (nextest runs each test in its own process anyway).
    pub(in crate::guard) static SERIAL: Mutex<()> = Mutex::new(());

    const MIB: usize = 1 << 20;

    /// Touched 1 MiB chunks: below the 8 MiB oversize threshold, so freed pages
    /// stay dirty in a normal arena until decay or a purge.
    fn touched_chunks(total: usize) -> Vec<Vec<u8>> {
        (0..total / MIB).map(|i| vec![i as u8 | 1; MIB]).collect()
    }

    #[test]
    fn stats_are_consistent() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let s = stats().unwrap();
        assert!(s.allocated > 0, "{s:?}");
        assert!(s.active >= s.allocated, "{s:?}");
        assert!(s.resident >= s.allocated, "{s:?}");
        assert!(s.mapped >= s.active, "{s:?}");
        assert!(is_global_allocator());
    }

    #[test]
    fn allocations_raise_allocated() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let before = stats().unwrap();
        let chunks = touched_chunks(65 * MIB);
        let during = stats().unwrap();
        assert!(
            during.allocated >= before.allocated + 64 * MIB as u64,
            "{before:?} -> {during:?}"
        );
        drop(chunks);
    }

    #[test]
    fn purge_returns_freed_pages() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        drop(touched_chunks(64 * MIB));
        let freed = stats().unwrap();
        purge_all().unwrap();
        let purged = stats().unwrap();
        let released = freed.resident.saturating_sub(purged.resident);
        assert!(
            released >= 32 * MIB as u64,
            "purge released {released} bytes: {freed:?} -> {purged:?}"
        );
        // Nothing dirty left: a second purge is cheap and still succeeds.
        purge_all().unwrap();
    }

    /// Documents why the guard needs a purge at all: with default options the
    /// oversize arena returns big buffers on free, but background threads (which
    /// the embedded conf turns on) make it decay like any other arena.
    #[test]
    fn oversize_buffers_are_returned_on_free_without_background_threads() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let conf = settings().unwrap();
        if conf.background_thread {
            eprintln!("skipped: background threads are on ({conf:?})");
            return;
        }
        // Earlier tests' dirty pages would blur the figures.
        purge_all().unwrap();
        let before = stats().unwrap();
        let big = vec![1u8; 64 * MIB];
        let during = stats().unwrap();
        drop(std::hint::black_box(big));
        let after = stats().unwrap();
        assert!(
            during.resident >= before.resident + 64 * MIB as u64,
            "{during:?}"
        );
        assert!(
            after.resident + 32 * MIB as u64 <= during.resident,
            "{after:?}"
        );
    }

    #[test]
    fn settings_are_readable() {
        let s = settings().unwrap();
        assert!(
            s.version.starts_with("5.") && !s.version.ends_with('\0'),
            "{s:?}"
        );
        assert!(!s.built_in_malloc_conf.contains('\0'), "{s:?}");
        assert!(s.narenas > 0, "{s:?}");
        assert!(s.dirty_decay_ms >= -1 && s.muzzy_decay_ms >= -1, "{s:?}");
        if s.env_malloc_conf.is_none() {
            assert_eq!(s.oversize_threshold, 8 * MIB as u64, "{s:?}");
        }
        // This test binary exports no `_rjem_malloc_conf`.
        assert_eq!(s.embedded_malloc_conf, None);
    }

    #[test]
    fn errors_name_the_errno() {
        let e = JemallocError::Mallctl {
            name: "arena.4096.purge",
            errno: libc::EPERM,
        };
        assert_eq!(e.to_string(), "mallctl arena.4096.purge failed with EPERM");
    }
}
