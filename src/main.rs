//! The `memgate` binary. It owns the global allocator; everything else is in the library.

use std::process::ExitCode;

// jemalloc: its stats let the guard see allocated and resident bytes, and its
// purge hands freed memory back to the OS after large requests.
#[cfg(target_os = "linux")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    memgate::cli::main()
}
