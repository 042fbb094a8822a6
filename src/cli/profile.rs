//! `memgate profile`: fetches a heap profile from a running server's admin
//! listener (`/debug/pprof/heap` or `/debug/pprof/heap.svg`, `[profiling]` on)
//! and writes it to a file, checking that it is what was asked for.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail};

/// What to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileFormat {
    /// Gzipped pprof protobuf, for `go tool pprof` and other pprof readers.
    Pprof,
    /// A flamegraph, for a browser.
    Svg,
}

impl ProfileFormat {
    /// `.svg` outputs get a flamegraph, anything else pprof.
    pub fn for_output(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("svg") => Self::Svg,
            _ => Self::Pprof,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Pprof => "/debug/pprof/heap",
            Self::Svg => "/debug/pprof/heap.svg",
        }
    }

    fn looks_right(self, body: &[u8]) -> bool {
        match self {
            // Every gzip stream starts with these two bytes (RFC 1952).
            Self::Pprof => body.starts_with(&[0x1f, 0x8b]),
            Self::Svg => {
                let head = String::from_utf8_lossy(&body[..body.len().min(512)]);
                head.contains("<svg")
            }
        }
    }
}

/// `http://host:port` for `host:port`; URLs pass unchanged (without a trailing `/`).
pub fn admin_url(addr: &str) -> String {
    let base = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    base.trim_end_matches('/').to_owned()
}

/// The bearer token: the first line of `token_file`, else `MEMGATE_TOKEN`.
pub fn token(token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        if token.is_empty() {
            bail!("the token file {} is empty", path.display());
        }
        return Ok(Some(token));
    }
    Ok(std::env::var("MEMGATE_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

/// Fetches a profile and writes it to `output` (through a temporary file
/// beside it, so a failed fetch never leaves half a profile). Returns its size.
pub async fn fetch(
    admin_addr: &str,
    format: ProfileFormat,
    token: Option<&str>,
    timeout: Duration,
    output: &Path,
) -> anyhow::Result<u64> {
    let url = format!("{}{}", admin_url(admin_addr), format.path());
    let client = reqwest::Client::builder()
        .timeout(timeout)
        // Admin listeners are reached directly (loopback, a pod IP, a port-forward).
        .no_proxy()
        .build()?;
    let mut request = client.get(&url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("GET {url}: reading the answer"))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let hint = match status.as_u16() {
            401 if token.is_none() => {
                " (the server has [auth] on: pass --token-file, or set MEMGATE_TOKEN, with a token that has the \"admin\" permission)"
            }
            403 => " (the token needs the \"admin\" permission in the tokens file)",
            _ => "",
        };
        bail!("GET {url}: {status}: {}{hint}", text.trim());
    }
    if !format.looks_right(&body) {
        bail!(
            "GET {url} answered {} bytes that are not a {} profile",
            body.len(),
            match format {
                ProfileFormat::Pprof => "gzipped pprof",
                ProfileFormat::Svg => "SVG",
            }
        );
    }
    let mut tmp = output.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, &body).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, output)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), output.display()))?;
    Ok(body.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(
            ProfileFormat::for_output(Path::new("heap.svg")),
            ProfileFormat::Svg
        );
        assert_eq!(
            ProfileFormat::for_output(Path::new("a/heap.SVG")),
            ProfileFormat::Svg
        );
        assert_eq!(
            ProfileFormat::for_output(Path::new("heap.pb.gz")),
            ProfileFormat::Pprof
        );
        assert_eq!(
            ProfileFormat::for_output(Path::new("heap")),
            ProfileFormat::Pprof
        );
    }

    #[test]
    fn addresses_become_urls() {
        assert_eq!(admin_url("127.0.0.1:9090"), "http://127.0.0.1:9090");
        assert_eq!(admin_url("http://pod:9090/"), "http://pod:9090");
    }

    #[test]
    fn bodies_are_checked_for_their_format() {
        assert!(ProfileFormat::Pprof.looks_right(&[0x1f, 0x8b, 8, 0]));
        assert!(!ProfileFormat::Pprof.looks_right(b"heap profiling is off"));
        assert!(ProfileFormat::Svg.looks_right(b"<?xml version=\"1.0\"?><svg "));
        assert!(!ProfileFormat::Svg.looks_right(&[0x1f, 0x8b]));
    }
}
