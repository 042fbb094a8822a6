//! jemalloc's sampling heap profiler: started when `[profiling] enabled` says
//! so, and read as a gzipped pprof profile or a flamegraph SVG for the admin
//! listener's `/debug/pprof/heap` and `/debug/pprof/heap.svg`.
//!
//! jemalloc is built with its profiler (tikv-jemallocator's `profiling`
//! feature) and the binary embeds [`MALLOC_CONF_C`], which loads it without
//! sampling; only start-up can do that (`opt.prof` is read-only afterwards).
//! [`start`] then sets the sample interval and turns sampling on. A profile is
//! jemalloc's own dump, parsed, symbolized in-process (the binary keeps line
//! tables: `[profile.release] debug = 1`) and converted by Polar Signals'
//! `jemalloc_pprof`. It shows the sampled allocations still live at the moment
//! of the dump, scaled up to estimates of bytes in use per call stack.
//!
//! Taking a profile blocks for tens of milliseconds to seconds (symbolization):
//! callers run [`profile`] on a blocking thread, never on the async workers
//! that answer probes. The mallctl calls here are the profiler's only; the
//! allocator's statistics and purge are [`crate::guard::jemalloc`]'s.

use crate::guard::jemalloc::EMBEDDED_MALLOC_CONF;

/// What the binary adds to the guard's jemalloc options: the profiler loaded
/// (`prof:true`) but not sampling (`prof_active:false`) until [`start`], with
/// jemalloc's default mean of 512 KiB between samples (`lg_prof_sample:19`).
pub const PROFILER_MALLOC_CONF: &str = "prof:true,prof_active:false,lg_prof_sample:19";

/// The binary's whole `_rjem_malloc_conf`: [`EMBEDDED_MALLOC_CONF`] (the
/// guard's choice, explained there) followed by [`PROFILER_MALLOC_CONF`]. A
/// compile-time check keeps it equal to the two.
pub const MALLOC_CONF_C: &std::ffi::CStr = c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,prof:true,prof_active:false,lg_prof_sample:19";

/// [`MALLOC_CONF_C`] as text.
pub const MALLOC_CONF: &str = match MALLOC_CONF_C.to_str() {
    Ok(conf) => conf,
    Err(_) => panic!("jemalloc options are ASCII"),
};

const _: () = assert!(
    is_joined(
        MALLOC_CONF.as_bytes(),
        EMBEDDED_MALLOC_CONF.as_bytes(),
        PROFILER_MALLOC_CONF.as_bytes()
    ),
    "MALLOC_CONF_C must be EMBEDDED_MALLOC_CONF + \",\" + PROFILER_MALLOC_CONF"
);

/// Whether `whole` is `a`, a comma, then `b`.
const fn is_joined(whole: &[u8], a: &[u8], b: &[u8]) -> bool {
    if whole.len() != a.len() + 1 + b.len() || whole[a.len()] != b',' {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if whole[i] != a[i] {
            return false;
        }
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        if whole[a.len() + 1 + j] != b[j] {
            return false;
        }
        j += 1;
    }
    true
}

/// Why no profile could be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfilingError {
    /// jemalloc's profiler is not loaded in this process.
    #[error("jemalloc's heap profiler is not loaded: {0}")]
    Unavailable(&'static str),
    /// Loaded, but sampling is off, so a profile would be empty.
    #[error("jemalloc's heap profiler is not sampling ([profiling] enabled is false)")]
    NotSampling,
    /// Another profile is being taken.
    #[error("another heap profile is being taken; try again when it is done")]
    Busy,
    /// jemalloc, the parser or the symbolizer failed.
    #[error("taking the heap profile failed: {0}")]
    Failed(String),
}

/// What a profile is rendered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// gzipped `perftools.profiles.Profile` (what `go tool pprof` reads),
    /// sample type `inuse_space`/`bytes`.
    Pprof,
    /// An inferno flamegraph of the same samples.
    FlamegraphSvg,
}

/// The profiler's state, for `memgate limits` and start-up checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProfilerState {
    /// `opt.prof`: the profiler was loaded at start-up.
    pub loaded: bool,
    /// `prof.active`: allocations are being sampled.
    pub sampling: bool,
    /// Mean bytes between samples (2^`prof.lg_sample`).
    pub sample_interval: u64,
}

#[cfg(target_os = "linux")]
mod imp {
    use jemalloc_pprof::{FlamegraphOptions, PROF_CTL, StackProfile};
    use tikv_jemalloc_ctl::raw;

    use super::{Format, ProfilerState, ProfilingError};

    fn failed(key: &str, e: impl std::fmt::Display) -> ProfilingError {
        ProfilingError::Failed(format!("mallctl {key}: {e}"))
    }

    fn loaded() -> Result<(), ProfilingError> {
        if !crate::guard::jemalloc::is_global_allocator() {
            return Err(ProfilingError::Unavailable(
                "jemalloc is not this process's allocator",
            ));
        }
        // SAFETY: `opt.prof` is a bool in jemalloc 5.3's mallctl namespace
        // (present because the `profiling` feature builds jemalloc with
        // --enable-prof), and bool is what is read.
        let on: bool = unsafe { raw::read(b"opt.prof\0") }.map_err(|e| failed("opt.prof", e))?;
        if on {
            Ok(())
        } else {
            Err(ProfilingError::Unavailable(
                "jemalloc started without prof:true (does _RJEM_MALLOC_CONF set prof:false?)",
            ))
        }
    }

    pub fn state() -> Result<ProfilerState, ProfilingError> {
        if let Err(e) = loaded() {
            return match e {
                ProfilingError::Unavailable(_) => Ok(ProfilerState {
                    loaded: false,
                    sampling: false,
                    sample_interval: 0,
                }),
                e => Err(e),
            };
        }
        // SAFETY: `prof.active` is a bool and `prof.lg_sample` a size_t in
        // jemalloc 5.3; both exist once `opt.prof` is on.
        let (active, lg) = unsafe {
            (
                raw::read::<bool>(b"prof.active\0"),
                raw::read::<usize>(b"prof.lg_sample\0"),
            )
        };
        Ok(ProfilerState {
            loaded: true,
            sampling: active.map_err(|e| failed("prof.active", e))?,
            sample_interval: 1u64 << lg.map_err(|e| failed("prof.lg_sample", e))?.min(63),
        })
    }

    pub fn start(lg_sample: u32) -> Result<(), ProfilingError> {
        loaded()?;
        let ctl = PROF_CTL.as_ref().ok_or(ProfilingError::Unavailable(
            "jemalloc started without prof:true",
        ))?;
        let mut ctl = ctl.try_lock().map_err(|_| ProfilingError::Busy)?;
        // SAFETY: `prof.reset` takes a size_t, the new lg_prof_sample; it drops
        // the samples taken so far, of which there are none before sampling.
        unsafe { raw::write(b"prof.reset\0", lg_sample as usize) }
            .map_err(|e| failed("prof.reset", e))?;
        ctl.activate().map_err(|e| failed("prof.active", e))
    }

    pub fn profile(format: Format) -> Result<Vec<u8>, ProfilingError> {
        loaded()?;
        let ctl = PROF_CTL.as_ref().ok_or(ProfilingError::Unavailable(
            "jemalloc started without prof:true",
        ))?;
        let mut ctl = ctl.try_lock().map_err(|_| ProfilingError::Busy)?;
        if !ctl.activated() {
            return Err(ProfilingError::NotSampling);
        }
        let lg_sample = ctl.lg_sample();
        let taken = ctl.dump_profile().and_then(|mut stacks| {
            drop_allocator_frames(&mut stacks);
            match format {
                Format::Pprof => {
                    Ok(stacks.to_pprof(("inuse_space", "bytes"), ("space", "bytes"), None))
                }
                Format::FlamegraphSvg => flamegraph(&stacks, lg_sample),
            }
        });
        // The symbolizer keeps what it parsed of the binary's debug info (the
        // most memory a profile takes) until told otherwise: a profile must
        // not leave its cost behind.
        backtrace::clear_symbol_cache();
        taken.map_err(|e| ProfilingError::Failed(format!("{e:#}")))
    }

    /// jemalloc records its own frames (the sampler, the allocation path) and
    /// the Rust allocator shims at the leaf of every stack; they say nothing
    /// about who allocated. Drops them: from the leaf, every frame whose
    /// function is the allocator's.
    fn drop_allocator_frames(profile: &mut StackProfile) {
        for (stack, _) in &mut profile.stacks {
            // Root first, leaf last.
            while stack.addrs.len() > 1 && stack.addrs.last().is_some_and(|&a| in_allocator(a)) {
                stack.addrs.pop();
            }
        }
    }

    /// Whether the function the return address `addr` lies in (the outermost
    /// of its frames: what the code was compiled into, not what was inlined
    /// there) is the allocator's.
    fn in_allocator(addr: usize) -> bool {
        let mut outermost = None;
        // One byte back is inside the call instruction (pprof_util does the
        // same); the resolver reports inlined frames innermost first.
        backtrace::resolve(addr.wrapping_sub(1) as *mut std::ffi::c_void, |symbol| {
            if let Some(name) = symbol.name() {
                outermost = Some(format!("{name:#}"));
            }
        });
        outermost.is_some_and(|name| super::is_allocator_function(&name))
    }

    fn flamegraph(stacks: &StackProfile, lg_sample: usize) -> anyhow::Result<Vec<u8>> {
        let every = bytesize::ByteSize::b(1 << lg_sample.min(63))
            .display()
            .iec_short()
            .to_string();
        if stacks.stacks.is_empty() {
            // inferno refuses an empty graph; say why there is nothing to draw.
            return Ok(format!(
                "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"60\" \
                 xmlns=\"http://www.w3.org/2000/svg\"><title>memgate: heap in use</title>\
                 <text x=\"600\" y=\"35\" text-anchor=\"middle\" font-family=\"monospace\" font-size=\"14\">\
                 memgate: heap in use: no samples yet (one per {every} allocated, on average)</text></svg>\n"
            )
            .into_bytes());
        }
        let mut opts = FlamegraphOptions::default();
        opts.title = "memgate: heap in use".into();
        opts.subtitle = Some(format!(
            "pid {}: bytes live now, estimated from a sample every {every} allocated on average",
            std::process::id()
        ));
        opts.count_name = "bytes".into();
        stacks.to_flamegraph(&mut opts)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::{Format, ProfilerState, ProfilingError};

    const OFF_LINUX: ProfilingError =
        ProfilingError::Unavailable("jemalloc is only linked on Linux");

    pub fn state() -> Result<ProfilerState, ProfilingError> {
        Err(OFF_LINUX)
    }
    pub fn start(_: u32) -> Result<(), ProfilingError> {
        Err(OFF_LINUX)
    }
    pub fn profile(_: Format) -> Result<Vec<u8>, ProfilingError> {
        Err(OFF_LINUX)
    }
}

/// Whether a (demangled) function name is jemalloc's or one of the Rust
/// allocator entry points that lead to it: what heads every sampled stack and
/// is dropped from it.
fn is_allocator_function(name: &str) -> bool {
    // jemalloc's exported functions carry tikv-jemalloc-sys's `_rjem_` prefix
    // (internal ones `_rjem_je_`); the allocation path's static ones are named
    // for what they do. Rust reaches them through `__rust_alloc` and friends
    // and tikv-jemallocator's `GlobalAlloc`.
    const JEMALLOC_STATIC: [&str; 8] = [
        "prof_",
        "imalloc",
        "ialloc",
        "irallocx",
        "do_rallocx",
        "ixallocx",
        "tcache_",
        "arena_",
    ];
    name.starts_with("_rjem_")
        || JEMALLOC_STATIC.iter().any(|p| name.starts_with(p))
        || name.starts_with("__rust_")
        || name.starts_with("__rustc::__rust_")
        || name.contains("tikv_jemallocator::")
}

/// Whether the profiler is loaded and sampling, and how often.
pub fn state() -> Result<ProfilerState, ProfilingError> {
    imp::state()
}

/// Sets the mean sample interval to 2^`lg_sample` bytes and turns sampling on.
/// Fails when jemalloc is not the allocator or was started without the
/// profiler (an `_RJEM_MALLOC_CONF` with `prof:false`).
pub fn start(lg_sample: u32) -> Result<(), ProfilingError> {
    imp::start(lg_sample)
}

/// Takes a heap profile of what is live now. Blocking (up to seconds): call it
/// on a blocking thread. One at a time; a second caller gets
/// [`ProfilingError::Busy`].
pub fn profile(format: Format) -> Result<Vec<u8>, ProfilingError> {
    imp::profile(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_conf_is_the_guards_plus_the_profilers() {
        assert!(is_joined(b"a:1,b:2", b"a:1", b"b:2"));
        assert!(!is_joined(b"a:1;b:2", b"a:1", b"b:2"));
        assert!(!is_joined(b"a:1,b:3", b"a:1", b"b:2"));
        assert!(!is_joined(b"a:1,b:2,c", b"a:1", b"b:2"));
        assert_eq!(
            MALLOC_CONF,
            format!("{EMBEDDED_MALLOC_CONF},{PROFILER_MALLOC_CONF}")
        );
    }

    #[test]
    fn allocator_frames_are_told_from_callers() {
        for name in [
            "prof_backtrace_impl",
            "_rjem_je_prof_backtrace",
            "_rjem_je_prof_tctx_create",
            "prof_alloc_prep",
            "imalloc_body",
            "irallocx_prof",
            "do_rallocx",
            "_rjem_malloc",
            "__rustc::__rust_realloc",
            "__rust_alloc_zeroed",
            "<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::alloc",
        ] {
            assert!(is_allocator_function(name), "{name}");
        }
        for name in [
            "alloc::alloc::realloc",
            "alloc::raw_vec::RawVecInner<A>::finish_grow",
            "bytes::bytes_mut::BytesMut::reserve_inner",
            "tonic::codec::decode::StreamingInner::decode_chunk",
            "memgate::admin::pprof::profile",
            "profile_hook",
        ] {
            assert!(!is_allocator_function(name), "{name}");
        }
    }

    /// This unit-test binary installs jemalloc without `_rjem_malloc_conf`:
    /// the profiler is compiled in but not loaded, and says so.
    #[cfg(target_os = "linux")]
    #[test]
    fn without_prof_true_there_is_nothing_to_start_or_dump() {
        let s = state().unwrap();
        assert!(!s.loaded && !s.sampling, "{s:?}");
        assert!(matches!(start(19), Err(ProfilingError::Unavailable(_))));
        assert!(matches!(
            profile(Format::Pprof),
            Err(ProfilingError::Unavailable(_))
        ));
    }
}
