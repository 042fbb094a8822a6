//! The `memgate` binary. It owns the global allocator and jemalloc's embedded
//! options; everything else is in the library.

use std::process::ExitCode;

// jemalloc: its stats let the guard see allocated and resident bytes, and its
// purge hands freed memory back to the OS after large requests.
#[cfg(target_os = "linux")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start-up; `_RJEM_MALLOC_CONF` overrides them.
/// Must equal `memgate::guard::jemalloc::EMBEDDED_MALLOC_CONF`, where the choice
/// is explained with measurements (a test checks they agree).
#[cfg(target_os = "linux")]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a NUL-terminated literal that lives for the whole program.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

fn main() -> ExitCode {
    memgate::cli::main()
}
