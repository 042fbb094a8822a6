//! `Config::load`: defaults, the example file, environment overrides,
//! human-readable values, and errors that name the key; then the real binary
//! started with a broken configuration.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bytesize::ByteSize;
use memgate::config::Config;

const MIB: u64 = 1024 * 1024;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/memgate.toml")
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Writes `toml` to a temporary file and loads it with no environment.
fn load_str(toml: &str) -> Result<Config, memgate::config::ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("memgate.toml");
    std::fs::write(&path, toml).expect("write config");
    Config::load(Some(&path), no_env())
}

/// Loads `toml`, expecting an error whose message contains every one of `needles`.
#[track_caller]
fn load_err(toml: &str, needles: &[&str]) -> String {
    let err = match load_str(toml) {
        Ok(cfg) => panic!("{toml:?} loaded: {cfg:?}"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(
            err.contains(n),
            "error for {toml:?} should mention {n:?}: {err}"
        );
    }
    err
}

#[test]
fn defaults_without_a_file() {
    let cfg = Config::load(None, no_env()).expect("defaults");
    assert_eq!(cfg, Config::default());
    assert_eq!(cfg.server.grpc_addr.to_string(), "127.0.0.1:50051");
    assert_eq!(cfg.server.max_message_size, ByteSize::mib(256));
    assert_eq!(cfg.storage.read_chunk_size, ByteSize::mib(1));
    assert_eq!(cfg.memory.budget_ratio, 0.85);
    assert_eq!(cfg.memory.limit, None);
}

#[test]
fn the_example_file_loads_and_equals_the_defaults() {
    let cfg = Config::load(Some(&example()), no_env()).expect("config/memgate.toml");
    assert_eq!(
        cfg,
        Config::default(),
        "config/memgate.toml must keep the defaults"
    );
}

/// One `key = value` line of config/memgate.toml.
struct ExampleEntry {
    section: String,
    key: String,
    /// The value as written, strings without their quotes.
    value: String,
    /// Whether a comment line is right above it.
    commented: bool,
}

/// Every `key = value` line of config/memgate.toml, with its section.
fn example_entries() -> Vec<ExampleEntry> {
    let text = std::fs::read_to_string(example()).expect("config/memgate.toml");
    let mut entries = Vec::new();
    let mut section = String::new();
    let mut commented = false;
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((key, value)) = line.split_once('=')
            && !line.starts_with('#')
        {
            entries.push(ExampleEntry {
                section: section.clone(),
                key: key.trim().to_string(),
                value: value.trim().trim_matches('"').to_string(),
                commented,
            });
        }
        commented = line.starts_with('#');
    }
    entries
}

/// Every key of the configuration is in the example, under its section, after a comment.
#[test]
fn the_example_file_documents_every_key() {
    let mut found = Vec::new();
    for e in example_entries() {
        let key = format!("{}.{}", e.section, e.key);
        assert!(e.commented, "{key} has no comment above it");
        found.push(key);
    }
    let defaults = serde_json::to_value(Config::default()).expect("serialize defaults");
    // Every leaf key, with nested tables ([storage.s3]) spelled out.
    fn leaves(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        match value.as_object() {
            Some(table) => {
                for (key, v) in table {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    leaves(&path, v, out);
                }
            }
            None => out.push(prefix.to_owned()),
        }
    }
    let mut keys = Vec::new();
    leaves("", &defaults, &mut keys);
    keys.sort();
    found.sort();
    assert_eq!(found, keys, "keys in config/memgate.toml vs. Config");
}

#[test]
fn environment_overrides_defaults_and_the_file() {
    let vars = env(&[
        ("MEMGATE__MEMORY__BUDGET_RATIO", "0.5"),
        ("MEMGATE__STORAGE__READ_CHUNK_SIZE", "2MiB"),
        // Not ours: ignored.
        ("PATH", "/usr/bin"),
        ("MEMGATEX__MEMORY__BUDGET_RATIO", "0.1"),
    ]);
    for file in [None, Some(example())] {
        let cfg = Config::load(file.as_deref(), vars.clone()).expect("load with env");
        assert_eq!(cfg.memory.budget_ratio, 0.5, "file {file:?}");
        assert_eq!(
            cfg.storage.read_chunk_size,
            ByteSize::mib(2),
            "file {file:?}"
        );
        let mut expected = Config::default();
        expected.memory.budget_ratio = 0.5;
        expected.storage.read_chunk_size = ByteSize::mib(2);
        assert_eq!(cfg, expected, "nothing else changes (file {file:?})");
    }

    // The environment beats the file.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("memgate.toml");
    std::fs::write(&path, "[memory]\nbudget_ratio = 0.7\nqueue_max = 9\n").expect("write");
    let cfg = Config::load(Some(&path), vars).expect("load");
    assert_eq!(cfg.memory.budget_ratio, 0.5);
    assert_eq!(cfg.memory.queue_max, 9);
}

#[test]
fn environment_values_are_validated_and_named() {
    let err = Config::load(None, env(&[("MEMGATE__MEMORY__BUDGET_RATIO", "1.5")]))
        .expect_err("budget_ratio 1.5 from the environment");
    assert!(err.to_string().contains("memory.budget_ratio"), "{err}");
}

#[test]
fn human_readable_sizes_and_durations() {
    let cfg = load_str(
        r#"
[server]
max_message_size = "128MiB"
[storage]
max_blob_size = 1048576
read_chunk_size = "512KiB"
partial_upload_expiry = "30s"
gc_interval = "1m 30s"
[memory]
limit = "2GiB"
reserve = "64 MiB"
queue_timeout = "1500ms"
poll_interval = "50ms"
"#,
    )
    .expect("human-readable values");
    assert_eq!(cfg.server.max_message_size.as_u64(), 128 * MIB);
    assert_eq!(cfg.storage.max_blob_size.as_u64(), MIB);
    assert_eq!(cfg.storage.read_chunk_size.as_u64(), 512 * 1024);
    assert_eq!(cfg.storage.partial_upload_expiry, Duration::from_secs(30));
    assert_eq!(cfg.storage.gc_interval, Duration::from_secs(90));
    assert_eq!(cfg.memory.limit, Some(ByteSize::gib(2)));
    assert_eq!(cfg.memory.reserve.as_u64(), 64 * MIB);
    assert_eq!(cfg.memory.queue_timeout, Duration::from_millis(1500));
    assert_eq!(cfg.memory.poll_interval, Duration::from_millis(50));
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    load_err("[memory]\nbuget_ratio = 0.5\n", &["buget_ratio"]);
    load_err("[storage]\nmax_blob_sise = \"1GiB\"\n", &["max_blob_sise"]);
    load_err("[storgae]\ndata_dir = \"/tmp\"\n", &["storgae"]);
    load_err("grpc_addr = \"127.0.0.1:1\"\n", &["grpc_addr"]);
}

#[test]
fn invalid_sizes_are_errors_naming_the_key() {
    load_err(
        "[storage]\nmax_blob_size = \"12 parsecs\"\n",
        &["max_blob_size"],
    );
    load_err(
        "[server]\nmax_message_size = \"-5MiB\"\n",
        &["max_message_size"],
    );
    load_err("[memory]\nlimit = \"lots\"\n", &["limit"]);
    // Parses, but out of range.
    load_err(
        "[storage]\nread_chunk_size = \"64MiB\"\n",
        &["storage.read_chunk_size"],
    );
    load_err(
        "[server]\nmax_message_size = \"8GiB\"\n",
        &["server.max_message_size"],
    );
    load_err("[memory]\nlimit = \"1MiB\"\n", &["memory.limit"]);
}

#[test]
fn the_profiling_sample_interval_is_a_power_of_two_in_range() {
    for bad in ["\"500KiB\"", "\"1KiB\"", "\"2GiB\"", "0"] {
        load_err(
            &format!("[profiling]\nsample_interval = {bad}\n"),
            &["profiling.sample_interval", "power of two"],
        );
    }
    let cfg = load_str("[profiling]\nenabled = true\nsample_interval = \"1MiB\"\n").unwrap();
    assert!(cfg.profiling.enabled);
    assert_eq!(cfg.profiling.lg_sample(), 20);
    assert_eq!(Config::default().profiling.lg_sample(), 19);
}

#[test]
fn ratios_out_of_range_are_errors_naming_the_key() {
    load_err(
        "[memory]\nbudget_ratio = 1.5\n",
        &["memory.budget_ratio", "1.5"],
    );
    load_err("[memory]\nbudget_ratio = 0\n", &["memory.budget_ratio"]);
    load_err(
        "[memory]\nhard_watermark = 1.01\n",
        &["memory.hard_watermark"],
    );
}

#[test]
fn soft_watermark_must_be_below_hard_watermark() {
    load_err(
        "[memory]\nsoft_watermark = 0.9\nhard_watermark = 0.8\n",
        &["memory.soft_watermark", "memory.hard_watermark"],
    );
    load_err(
        "[memory]\nsoft_watermark = 0.8\nhard_watermark = 0.8\n",
        &["memory.soft_watermark"],
    );
}

#[test]
fn abuse_limits_are_checked_and_named() {
    let cfg = load_str(
        "[server]\nstream_idle_timeout = \"0s\"\nmin_throughput = 0\n\
         keepalive_interval = \"0s\"\nmax_header_list_size = \"64KiB\"\n\
         [memory]\nmax_client_share = 1\n",
    )
    .expect("0 turns the limits off; a share of 1 is no cap");
    assert!(cfg.server.stream_limits().is_off());
    assert_eq!(cfg.server.max_header_list_size, ByteSize::kib(64));
    assert_eq!(cfg.memory.max_client_share, 1.0);
    for (toml, key) in [
        (
            "[server]\nstream_idle_timeout = \"10ms\"\n",
            "server.stream_idle_timeout",
        ),
        (
            "[server]\nstream_idle_timeout = \"2d\"\n",
            "server.stream_idle_timeout",
        ),
        (
            "[server]\nmin_throughput = \"2GiB\"\n",
            "server.min_throughput",
        ),
        (
            "[server]\nmin_throughput_window = \"0s\"\n",
            "server.min_throughput_window",
        ),
        (
            "[server]\nkeepalive_interval = \"10ms\"\n",
            "server.keepalive_interval",
        ),
        (
            "[server]\nkeepalive_timeout = \"0s\"\n",
            "server.keepalive_timeout",
        ),
        (
            "[server]\nmax_header_list_size = \"100B\"\n",
            "server.max_header_list_size",
        ),
        (
            "[server]\nmax_header_list_size = \"2MiB\"\n",
            "server.max_header_list_size",
        ),
        (
            "[memory]\nmax_client_share = 0\n",
            "memory.max_client_share",
        ),
        (
            "[memory]\nmax_client_share = 1.5\n",
            "memory.max_client_share",
        ),
    ] {
        load_err(toml, &[key]);
    }
    load_err(
        "[server]\nstream_idle_timeout = \"soon\"\n",
        &["stream_idle_timeout"],
    );
    load_err("[server]\nmin_throughput = \"fast\"\n", &["min_throughput"]);
}

#[test]
fn transport_limits_are_checked_and_named() {
    let cfg = load_str(
        "[server]\nconnection_idle_timeout = \"0s\"\nmax_connections = 10\n\
         max_connections_per_client = 10\nmax_concurrent_streams = 256\n",
    )
    .expect("0s turns the idle close off; the per-client cap may equal the total");
    assert!(cfg.server.connection_idle_timeout.is_zero());
    assert_eq!(memgate::server::connection_window(&cfg.server), 1 << 30);
    for (toml, key) in [
        ("[server]\nmax_connections = 0\n", "server.max_connections"),
        (
            "[server]\nmax_connections = 10\nmax_connections_per_client = 11\n",
            "server.max_connections_per_client",
        ),
        (
            "[server]\nmax_connections_per_client = 0\n",
            "server.max_connections_per_client",
        ),
        (
            "[server]\nmax_calls_per_client = 0\n",
            "server.max_calls_per_client",
        ),
        (
            "[server]\nconnection_idle_timeout = \"10ms\"\n",
            "server.connection_idle_timeout",
        ),
        (
            "[server]\nmax_concurrent_streams = 257\n",
            "server.max_concurrent_streams",
        ),
        (
            "[server]\nmax_local_error_reset_streams = 0\n",
            "server.max_local_error_reset_streams",
        ),
        (
            "[server]\nmax_pending_accept_reset_streams = 0\n",
            "server.max_pending_accept_reset_streams",
        ),
    ] {
        load_err(toml, &[key]);
    }
}

#[test]
fn bad_durations_are_errors_naming_the_key() {
    load_err(
        "[storage]\npartial_upload_expiry = \"30 parsecs\"\n",
        &["partial_upload_expiry"],
    );
    load_err("[memory]\nqueue_timeout = \"soon\"\n", &["queue_timeout"]);
    load_err(
        "[storage]\ngc_interval = \"0s\"\n",
        &["storage.gc_interval"],
    );
    load_err(
        "[memory]\npoll_interval = \"1ms\"\n",
        &["memory.poll_interval"],
    );
}

#[test]
fn missing_or_unreadable_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.toml");
    let err = Config::load(Some(&missing), no_env()).expect_err("missing file");
    assert!(err.to_string().contains("nope.toml"), "{err}");

    // A directory where the file should be.
    let err = Config::load(Some(dir.path()), no_env()).expect_err("a directory");
    let dir_name = dir
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(err.to_string().contains(&dir_name), "{err}");

    // Not TOML at all.
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, "[memory\nbudget_ratio = \n").expect("write");
    let err = Config::load(Some(&garbage), no_env()).expect_err("broken TOML");
    assert!(err.to_string().contains("garbage.toml"), "{err}");
}

/// Runs `memgate serve` with `toml` as its config; returns (exit code, stderr).
fn serve_with_config(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("memgate.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memgate"));
    cmd.args([
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--config",
    ])
    .arg(&path)
    .arg("--data-dir")
    .arg(dir.path().join("data"))
    .env_remove("RUST_LOG")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("MEMGATE__") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().expect("start memgate");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("memgate started despite the broken config {toml:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status.code(), stderr)
}

/// Asserts `memgate serve` with `toml` exits non-zero with one stderr line that
/// contains every one of `needles` and says it once.
#[track_caller]
fn assert_one_line_error(toml: &str, needles: &[&str]) {
    let (code, stderr) = serve_with_config(toml);
    assert!(
        code.is_some_and(|c| c != 0),
        "exit code {code:?} for {toml:?}"
    );
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stderr for {toml:?} should be one line:\n{stderr}"
    );
    let message = lines[0]
        .strip_prefix("memgate: error: ")
        .unwrap_or_else(|| panic!("unexpected prefix: {stderr}"));
    for n in needles {
        assert!(
            message.contains(n),
            "stderr for {toml:?} should name {n}: {stderr}"
        );
    }
    let head: String = message.chars().take(40).collect();
    assert_eq!(
        message.matches(&head).count(),
        1,
        "the error is repeated: {stderr}"
    );
}

#[test]
fn the_binary_reports_an_invalid_value_in_one_line_naming_the_key() {
    assert_one_line_error(
        "[memory]\nbudget_ratio = 1.5\n",
        &["memory.budget_ratio", "1.5"],
    );
    assert_one_line_error(
        "[memory]\nsoft_watermark = 0.99\n",
        &["memory.soft_watermark"],
    );
    assert_one_line_error(
        "[storage]\nread_chunk_size = \"1GiB\"\n",
        &["storage.read_chunk_size"],
    );
}

// Every load error is printed once, on one line.
#[test]
fn the_binary_reports_an_unknown_key_or_unparsable_value_once_in_one_line() {
    assert_one_line_error("[memory]\nbuget_ratio = 0.5\n", &["buget_ratio", "memory"]);
    assert_one_line_error(
        "[storage]\nmax_blob_size = \"12 parsecs\"\n",
        &["storage.max_blob_size"],
    );
    assert_one_line_error(
        "[storage]\ngc_interval = \"often\"\n",
        &["storage.gc_interval"],
    );
}

// A TOML syntax error is folded onto one line naming the file and position.
#[test]
fn the_binary_reports_a_toml_syntax_error_in_one_line() {
    assert_one_line_error("[memory\nbudget_ratio = 0.5\n", &["memgate.toml", "line 1"]);
}

// Keys that config-rs would read as paths or indices (`x[99999999999]` made it
// allocate until the process died; found by fuzzing) are refused up front.
#[test]
fn keys_with_brackets_are_refused_before_they_reach_the_loader() {
    load_err(
        "\"x[99999999999]\" = 1\n",
        &["x[99999999999]", "letters, digits and _"],
    );
    load_err("[memory]\n\"limit[3]\" = 1\n", &["memory.limit[3]"]);
    let err = Config::load(None, env(&[("MEMGATE__X[99999999999]", "1")])).expect_err("refused");
    assert!(err.to_string().contains("MEMGATE__X[99999999999]"), "{err}");
}

// tracing-subscriber's filter parser panics on some non-ASCII input (found by fuzzing).
#[test]
fn a_non_ascii_log_level_is_an_error_naming_the_key() {
    load_err("[log]\nlevel = \" é[\"\n", &["log.level", "ASCII"]);
    let err =
        Config::load(None, env(&[("MEMGATE__LOG__LEVEL", "info, é[x]")])).expect_err("refused");
    assert!(err.to_string().contains("log.level"), "{err}");
}

#[test]
fn log_filters_may_have_spaces_between_directives() {
    let cfg = load_str("[log]\nlevel = \"memgate=debug, tower=warn ,info\"\n").expect("loads");
    assert_eq!(cfg.log.level, "memgate=debug, tower=warn ,info");
    load_err("[log]\nlevel = \"memgate=nonsense\"\n", &["log.level"]);
}

#[test]
fn s3_settings_are_checked_only_for_the_s3_backend() {
    // The local default needs no bucket, and unused [storage.s3] values are not judged.
    load_str("[storage.s3]\npart_size = \"1MiB\"\n")
        .expect("s3 settings are ignored with the local backend");
    load_err("[storage]\nbackend = \"s3\"\n", &["storage.s3.bucket"]);
    load_err("[storage]\nbackend = \"ftp\"\n", &["backend", "ftp"]);
    let s3 = "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\n";
    load_err(
        &format!("{s3}part_size = \"4MiB\"\n"),
        &["storage.s3.part_size", "5MiB"],
    );
    load_err(
        &format!("{s3}parts_in_flight = 0\n"),
        &["storage.s3.parts_in_flight"],
    );
    load_err(
        &format!("{s3}endpoint = \"garage:3900\"\n"),
        &["storage.s3.endpoint", "http://"],
    );
    load_err(
        &format!("{s3}retry_timeout = \"0s\"\n"),
        &["storage.s3.retry_timeout"],
    );
    load_err(
        &format!("{s3}secret_access_key = \"x\"\n"),
        &["secret_access_key"],
    );
    let cfg = load_str(s3).expect("minimal s3 config");
    assert_eq!(cfg.storage.backend, memgate::config::Backend::S3);
    assert_eq!(cfg.storage.s3.bucket, "b");
}

/// docs/configuration.md's table has one row per section of config/memgate.toml
/// naming every key of it, and where the row gives a key's default in
/// parentheses, that is the example's value: a new key without docs fails here.
#[test]
fn the_configuration_doc_names_every_key_with_its_default() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/configuration.md");
    // "| `[section]` | keys |" rows, by section.
    let rows: std::collections::BTreeMap<&str, &str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `["))
        .filter_map(|l| l.split_once("]` |"))
        .collect();
    let entries = example_entries();
    let sections: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.section.as_str()).collect();
    assert_eq!(
        rows.keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        sections,
        "sections in docs/configuration.md's table vs. config/memgate.toml"
    );
    for e in &entries {
        let row = rows[e.section.as_str()];
        let name = format!("`{}`", e.key);
        assert!(
            row.contains(&name),
            "docs/configuration.md does not name {}.{} in the [{}] row",
            e.section,
            e.key,
            e.section
        );
        // `key` (`value` ...), `key` (value ...), `key` (empty: ...).
        for (at, _) in row.match_indices(&name) {
            let Some(paren) = row[at + name.len()..].strip_prefix(" (") else {
                continue;
            };
            let paren = paren.strip_prefix("both ").unwrap_or(paren);
            let documented = match paren.strip_prefix('`') {
                Some(quoted) => quoted.split('`').next().unwrap_or_default(),
                None => paren
                    .split([')', ';', ':', ',', ' '])
                    .next()
                    .unwrap_or_default(),
            };
            let documented = if documented == "empty" {
                ""
            } else {
                documented
            };
            assert_eq!(
                documented, e.value,
                "docs/configuration.md gives {}.{} the default {documented:?}, config/memgate.toml {:?}",
                e.section, e.key, e.value
            );
        }
    }
}
