//! The `memgate` binary. It owns the global allocator and jemalloc's embedded
//! options; everything else is in the library.

use std::process::ExitCode;

// jemalloc: its stats let the guard see allocated and resident bytes, and its
// purge hands freed memory back to the OS after large requests.
#[cfg(target_os = "linux")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start-up; `_RJEM_MALLOC_CONF` overrides
/// them key by key. The guard's choice, explained with measurements at
/// `EMBEDDED_MALLOC_CONF`, plus the heap profiler loaded but not sampling
/// until `[profiling]` turns it on (`memgate::admin::pprof::MALLOC_CONF`).
#[cfg(target_os = "linux")]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a NUL-terminated literal that lives for the whole program.
    Some(unsafe { &*memgate::admin::pprof::MALLOC_CONF_C.as_ptr() });

fn main() -> ExitCode {
    memgate::cli::main()
}
