//! `memgate::config::Config::load`: the TOML file and `MEMGATE__*` variables are
//! operator input, and a typo or a templating accident must give an error that
//! names the key, never a panic at start-up or on SIGHUP reload.
//!
//! Input: any bytes as text (lossily converted), split at NUL characters. The
//! first piece is the TOML file; each further piece `KEY=VALUE` is an environment
//! variable (`KEY` gets the `MEMGATE__` prefix unless it starts with `MEMGATE`;
//! a piece without `=` is a variable with an empty value).
//!
//! The file is loaded with the variables, and the variables alone too (no file).
//! Either must return `Ok` or `Err`; an `Ok` configuration must pass `validate()`,
//! and a file or variable that cannot be read or parsed
//! (`ConfigError::Load`) must give a one-line message.

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use memgate::config::{Config, ConfigError};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A file of its own per call, removed on drop: libFuzzer runs one input at a
/// time, but the regression test may run targets on parallel threads.
struct TempToml(PathBuf);

impl TempToml {
    fn new(content: &str) -> Self {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("memgate-fuzz-{}-{n}.toml", std::process::id()));
        fs::write(&path, content).expect("write the temporary config file");
        Self(path)
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn env_pairs<'a>(pieces: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    pieces
        .map(|piece| {
            let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
            let key = if key.starts_with("MEMGATE") {
                key.to_owned()
            } else {
                format!("MEMGATE__{key}")
            };
            (key, value.to_owned())
        })
        .collect()
}

fn check(result: Result<Config, ConfigError>, what: &str) {
    match result {
        Ok(cfg) => {
            if let Err(e) = cfg.validate() {
                panic!("{what}: load gave Ok but validate() says {e}: {cfg:?}");
            }
        }
        Err(e) => {
            let msg = e.to_string();
            if let ConfigError::Load(_) = e {
                assert!(!msg.contains('\n'), "{what}: multi-line load error {msg:?}");
            }
        }
    }
}

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut pieces = text.split('\0');
    let toml = pieces.next().unwrap_or_default();
    let env = env_pairs(pieces);

    let file = TempToml::new(toml);
    check(Config::load(Some(&file.0), env.clone()), "file + env");
    drop(file);
    if !env.is_empty() {
        check(Config::load(None, env), "env only");
    }
}
