//! How much memory jemalloc keeps resident after one tonic-sized request, with
//! and without `purge_all`, under the allocator options worth considering. The
//! figures behind `memgate::guard::jemalloc::EMBEDDED_MALLOC_CONF`.
//!
//! The request: a 150 MB `BytesMut` reserved at once and filled in 16 KiB
//! frames (tonic's decode buffer), plus 150 MB in 3 MB `Vec`s (a handler's
//! chunks), built and freed on a worker thread that stays alive. Then resident bytes are read
//! at 0 s, 1 s and 5 s, from jemalloc (`stats.resident`) and the kernel (VmRSS).
//!
//! Every configuration in its own process (options are read at start-up):
//!
//! ```text
//! cargo run --release --example jemalloc_decay -- --all
//! ```
//!
//! One configuration: `_RJEM_MALLOC_CONF=background_thread:true cargo run
//! --release --example jemalloc_decay -- [--purge | --settings]`.

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(target_os = "linux")]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--all") {
        run_all();
    } else if args.iter().any(|a| a == "--settings") {
        println!("{:#?}", memgate::guard::jemalloc::settings());
    } else {
        measure(args.iter().any(|a| a == "--purge"));
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("jemalloc is only linked on Linux");
}

/// The configurations compared, as `_RJEM_MALLOC_CONF` values ("" = defaults).
#[cfg(target_os = "linux")]
const CONFS: &[&str] = &[
    "",
    "dirty_decay_ms:1000,muzzy_decay_ms:0",
    "background_thread:true",
    "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0",
];

#[cfg(target_os = "linux")]
fn run_all() {
    let exe = std::env::current_exe().expect("own path");
    println!(
        "{:<60} {:>5} {:>8} {:>7} | {:>20} | {:>20}",
        "_RJEM_MALLOC_CONF", "purge", "ms", "idle µs", "jemalloc MB 0s/1s/5s", "VmRSS MB 0s/1s/5s"
    );
    for conf in CONFS {
        for purge in [false, true] {
            let mut cmd = std::process::Command::new(&exe);
            cmd.env("_RJEM_MALLOC_CONF", conf);
            if purge {
                cmd.arg("--purge");
            }
            let out = cmd.output().expect("run a measurement");
            let line = String::from_utf8_lossy(&out.stdout);
            let name = if conf.is_empty() { "(default)" } else { conf };
            println!("{name:<60} {purge:>5} {}", line.trim_end());
        }
    }
}

#[cfg(target_os = "linux")]
fn measure(purge: bool) {
    use std::time::{Duration, Instant};

    use memgate::guard::jemalloc;

    const MB: usize = 1_000_000;
    // Tokio's workers outlive requests; a thread that exits returns its
    // arena's pages and would flatter every configuration.
    let (freed_tx, freed) = std::sync::mpsc::channel();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let frame = [0x5au8; 16 * 1024];
        let mut decode = bytes::BytesMut::with_capacity(150 * MB);
        while decode.len() + frame.len() <= 150 * MB {
            decode.extend_from_slice(&frame);
        }
        let chunks: Vec<Vec<u8>> = (0..50).map(|i| vec![i as u8 | 1; 3 * MB]).collect();
        drop(std::hint::black_box((decode, chunks)));
        freed_tx.send(()).expect("main waits");
        let _ = done_rx.recv();
    });
    freed.recv().expect("workload");

    let freed_at = Instant::now();
    let (mut purge_ms, mut idle_purge_us) = (f64::NAN, f64::NAN);
    if purge {
        let started = Instant::now();
        jemalloc::purge_all().expect("purge");
        purge_ms = started.elapsed().as_secs_f64() * 1e3;
        // Nothing dirty left: what a purge costs when it finds nothing.
        let started = Instant::now();
        jemalloc::purge_all().expect("purge");
        idle_purge_us = started.elapsed().as_secs_f64() * 1e6;
    }
    let mut resident = Vec::new();
    let mut rss = Vec::new();
    for at in [0, 1, 5] {
        std::thread::sleep(Duration::from_secs(at).saturating_sub(freed_at.elapsed()));
        resident.push(jemalloc::stats().expect("stats").resident as f64 / MB as f64);
        rss.push(vm_rss_kb() as f64 * 1024.0 / MB as f64);
    }
    drop(done);
    worker.join().expect("worker");
    let fmt = |v: &[f64]| format!("{:>6.1} {:>6.1} {:>6.1}", v[0], v[1], v[2]);
    println!(
        "{purge_ms:>8.1} {idle_purge_us:>7.1} | {} | {}",
        fmt(&resident),
        fmt(&rss)
    );
}

#[cfg(target_os = "linux")]
fn vm_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}
