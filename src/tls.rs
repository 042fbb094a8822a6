//! TLS for the gRPC listener, with certificates reloaded from disk while the
//! server runs. cert-manager (or any Secret rotation) rewrites the mounted files
//! in place; [`spawn_reload`] notices, builds a new `rustls` configuration and
//! swaps it in for new connections. Established connections keep the session
//! they negotiated. A broken new set (unreadable, mismatched key, bad PEM) is
//! refused with one error line and the previous configuration stays.
//!
//! With `tls.client_ca_file`, clients must present a certificate signed by that
//! bundle (mutual TLS); [`identities`] names such a certificate for
//! authorization and logs.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::aws_lc_rs,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::config::TlsConfig;

/// A client that connects and never finishes its handshake is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a TLS configuration could not be built; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn invalid(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no certificate"));
    }
    Ok(certs)
}

/// Builds the server configuration from the files `cfg` names.
pub fn load(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(&cfg.cert_file)?;
    let key_pem = read(&cfg.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid(&cfg.key_file, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if cfg.client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for ca in certs(&cfg.client_ca_file)? {
            roots
                .add(ca)
                .map_err(|e| invalid(&cfg.client_ca_file, format!("bad CA certificate: {e}")))?;
        }
        let verifier: Arc<dyn ClientCertVerifier> =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(&cfg.client_ca_file, e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&cfg.cert_file, format!("does not match the key: {e}")))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration new connections get; swapped on reload.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Tls {
    /// Loads the files once; start-up fails if they are unusable.
    pub fn new(cfg: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: Arc::new(RwLock::new(load(cfg)?)),
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn replace(&self, config: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// The TLS handshake on an accepted connection, with the configuration in
    /// force now, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor().accept(tcp)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}"),
            )),
        }
    }
}

/// Modification times of the files, to notice a rotation.
fn stamps(cfg: &TlsConfig) -> Vec<Option<SystemTime>> {
    [&cfg.cert_file, &cfg.key_file, &cfg.client_ca_file]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Re-reads the files every `tls.reload_interval` when they changed, until the
/// returned task is aborted or the server ends.
pub fn spawn_reload(tls: &Tls, cfg: TlsConfig) -> JoinHandle<()> {
    let weak = Arc::downgrade(&tls.current);
    tokio::spawn(async move {
        let mut seen = stamps(&cfg);
        let mut tick = tokio::time::interval(cfg.reload_interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(current) = weak.upgrade() else {
                return;
            };
            let now = stamps(&cfg);
            if now == seen {
                continue;
            }
            seen = now;
            let load_cfg = cfg.clone();
            match tokio::task::spawn_blocking(move || load(&load_cfg)).await {
                Ok(Ok(config)) => {
                    Tls { current }.replace(config);
                    tracing::info!(cert = %cfg.cert_file.display(), "TLS certificate reloaded; new connections use it");
                }
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    "new TLS files rejected; keeping the previous certificate"
                ),
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    })
}

/// The names a client certificate can be granted permissions under: its URI
/// SANs (SPIFFE IDs), DNS SANs, then its subject's common name.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => names.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_owned());
        }
    }
    names
}
