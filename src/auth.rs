//! Who may call what. A tower layer in front of the memory guard, so a caller
//! without credentials is turned away before anything is reserved.
//!
//! Credentials are a bearer token (`authorization: Bearer <token>`) or, under
//! mutual TLS, the client certificate's identity ([`crate::tls::identities`]).
//! Both are looked up in the tokens file, which holds only SHA-256 hashes of
//! tokens: a presented token is hashed and compared with every entry in
//! constant time. Each entry has a name (what logs and fairness see; never the
//! token) and permissions. Missing or unknown credentials are
//! `UNAUTHENTICATED`; known ones without the method's permission are
//! `PERMISSION_DENIED`. Health checks and reflection need none.
//!
//! The file is re-read when it changes; a broken new file is refused with an
//! error line and the previous table stays.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::SystemTime,
};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tonic::{
    Status,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use crate::api::access_log::CallClient;
use crate::config::AuthConfig;
use crate::guard::ClientKey;

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// ByteStream Read.
    Read,
    /// ByteStream Write and QueryWriteStatus.
    Write,
    /// Payload Process.
    Process,
    /// Heap profiles on the admin listener (`/debug/pprof/...`). No gRPC
    /// method needs it, and it grants none.
    Admin,
}

/// The permission a method needs; `None`: open to all (health, reflection).
/// Methods memgate does not know need every permission, so only a full
/// principal reaches tonic's UNIMPLEMENTED.
pub fn required(path: &str) -> Option<&'static [Permission]> {
    const READ: &[Permission] = &[Permission::Read];
    const WRITE: &[Permission] = &[Permission::Write];
    const PROCESS: &[Permission] = &[Permission::Process];
    const ALL: &[Permission] = &[Permission::Read, Permission::Write, Permission::Process];
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return None;
    }
    Some(match path {
        "/google.bytestream.ByteStream/Read" => READ,
        "/google.bytestream.ByteStream/Write"
        | "/google.bytestream.ByteStream/QueryWriteStatus" => WRITE,
        "/memgate.v1.Payload/Process" => PROCESS,
        _ => ALL,
    })
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub permissions: Vec<Permission>,
}

impl Principal {
    fn may(&self, needed: &[Permission]) -> bool {
        needed.iter().all(|p| self.permissions.contains(p))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    #[serde(default)]
    identities: Vec<IdentityEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    permissions: Vec<Permission>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityEntry {
    name: String,
    permissions: Vec<Permission>,
}

/// The parsed tokens file.
#[derive(Debug, Default)]
pub struct Table {
    tokens: Vec<([u8; 32], Principal)>,
    identities: HashMap<String, Principal>,
}

/// Why a tokens file was refused; never quotes a hash or a token.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct AuthFileError {
    path: PathBuf,
    problem: String,
}

impl Table {
    /// Parses a tokens file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: FileFormat = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut table = Table::default();
        let mut names = std::collections::HashSet::new();
        for (i, t) in file.tokens.into_iter().enumerate() {
            let hash = hex::decode(t.sha256.trim())
                .ok()
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .ok_or_else(|| {
                    format!("tokens[{i}] ({}): sha256 must be 64 hex characters", t.name)
                })?;
            if !names.insert(t.name.clone()) {
                return Err(format!("tokens[{i}]: the name {:?} is used twice", t.name));
            }
            table.tokens.push((
                hash,
                Principal {
                    name: t.name.into(),
                    permissions: t.permissions,
                },
            ));
        }
        for id in file.identities {
            let principal = Principal {
                name: id.name.clone().into(),
                permissions: id.permissions,
            };
            if table
                .identities
                .insert(id.name.clone(), principal)
                .is_some()
            {
                return Err(format!("identities: {:?} is listed twice", id.name));
            }
        }
        Ok(table)
    }

    /// The principal whose token hashes to the same value. Every entry is
    /// compared, in constant time, whether or not one matched.
    pub fn by_token(&self, token: &str) -> Option<&Principal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (h, p) in &self.tokens {
            if bool::from(h.ct_eq(&hash)) {
                found = Some(p);
            }
        }
        found
    }

    /// The principal a certificate identity maps to, if any.
    pub fn by_identity<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<&Principal> {
        names.into_iter().find_map(|n| self.identities.get(n))
    }
}

/// The current table, reloaded from `auth.tokens_file`.
#[derive(Clone)]
pub struct Authorizer {
    table: Arc<RwLock<Arc<Table>>>,
    path: PathBuf,
}

fn load(path: &Path) -> Result<Table, AuthFileError> {
    let err = |problem: String| AuthFileError {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    Table::parse(&text).map_err(err)
}

impl Authorizer {
    /// Loads the tokens file; start-up fails if it is unusable.
    pub fn new(cfg: &AuthConfig) -> Result<Self, AuthFileError> {
        let table = load(&cfg.tokens_file)?;
        Ok(Self {
            table: Arc::new(RwLock::new(Arc::new(table))),
            path: cfg.tokens_file.clone(),
        })
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the file every `interval` when it changed.
    pub fn spawn_reload(&self, interval: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.table);
        let path = self.path.clone();
        tokio::spawn(async move {
            let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen: Option<SystemTime> = stamp(&path);
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(table) = weak.upgrade() else { return };
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match load(&path) {
                    Ok(new) => {
                        let counts = (new.tokens.len(), new.identities.len());
                        *table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                        tracing::info!(
                            tokens = counts.0,
                            identities = counts.1,
                            "tokens file reloaded"
                        );
                    }
                    Err(e) => tracing::error!(
                        error = %e,
                        "new tokens file rejected; keeping the previous one"
                    ),
                }
            }
        })
    }

    /// Authenticates and authorizes a call to `path`.
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        ext: &http::Extensions,
    ) -> Result<Option<Principal>, Status> {
        let Some(needed) = required(path) else {
            return Ok(None);
        };
        let table = self.table();
        let principal = match bearer(headers)? {
            Some(token) => table
                .by_token(token)
                .ok_or_else(|| Status::unauthenticated("unknown bearer token"))?,
            None => {
                let names = peer_identities(ext);
                table
                    .by_identity(names.iter().map(String::as_str))
                    .ok_or_else(|| {
                        Status::unauthenticated(if names.is_empty() {
                            "credentials required: send `authorization: Bearer <token>` metadata"
                                .to_owned()
                        } else {
                            format!("client certificate {:?} is not granted access", names[0])
                        })
                    })?
            }
        };
        if !principal.may(needed) {
            return Err(Status::permission_denied(format!(
                "{} may not call {path}: it needs {:?}",
                principal.name, needed
            )));
        }
        Ok(Some(principal.clone()))
    }
}

impl Authorizer {
    /// Authenticates a plain HTTP request on the admin listener by its bearer
    /// token (the listener is plaintext, so there are no client certificates)
    /// and checks that its principal has `needed`. Errors are UNAUTHENTICATED
    /// (no or unknown token) or PERMISSION_DENIED, for the caller to map to
    /// 401 and 403.
    pub fn check_bearer(
        &self,
        what: &str,
        needed: &[Permission],
        headers: &http::HeaderMap,
    ) -> Result<Principal, Status> {
        let token = bearer(headers)?.ok_or_else(|| {
            Status::unauthenticated("credentials required: send `Authorization: Bearer <token>`")
        })?;
        let table = self.table();
        let principal = table
            .by_token(token)
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))?;
        if !principal.may(needed) {
            return Err(Status::permission_denied(format!(
                "{} may not read {what}: it needs {:?}",
                principal.name, needed
            )));
        }
        Ok(principal.clone())
    }
}

/// The bearer token, if an `authorization` header carries one.
fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(Status::unauthenticated(
            "authorization metadata must be `Bearer <token>`",
        )),
    }
}

/// The identities of the TLS client certificate of this connection, if any.
pub fn peer_identities(ext: &http::Extensions) -> Vec<String> {
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(crate::tls::identities))
        .unwrap_or_default()
}

/// Puts [`Authorizer::check`] in front of a service.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Option<Authorizer>,
}

impl AuthLayer {
    /// `None`: authentication off; every call passes (and is named by the peer).
    pub fn new(auth: Option<Authorizer>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Authorizer>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<tonic::body::Body>> for AuthService<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let Some(auth) = &self.auth else {
            return Box::pin(self.inner.call(req));
        };
        match auth.check(req.uri().path(), req.headers(), req.extensions()) {
            Ok(principal) => {
                if let Some(p) = principal {
                    if let Some(slot) = req.extensions().get::<CallClient>() {
                        slot.set(p.name.clone());
                    }
                    // Fair shares of the memory budget are per principal.
                    req.extensions_mut().insert(ClientKey(p.name.clone()));
                    req.extensions_mut().insert(p);
                }
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::debug!(path = req.uri().path(), code = ?status.code(), "call refused by auth");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn table() -> Table {
        Table::parse(&format!(
            "[[tokens]]\nname = \"uploader\"\nsha256 = \"{}\"\npermissions = [\"read\", \"write\"]\n\
             [[tokens]]\nname = \"reader\"\nsha256 = \"{}\"\npermissions = [\"read\"]\n\
             [[identities]]\nname = \"spiffe://cluster.local/ns/a/sa/worker\"\npermissions = [\"process\"]\n",
            hash("secret-up"),
            hash("secret-read")
        ))
        .expect("valid file")
    }

    #[test]
    fn tokens_are_found_by_their_hash_only() {
        let t = table();
        assert_eq!(&*t.by_token("secret-up").unwrap().name, "uploader");
        assert_eq!(&*t.by_token("secret-read").unwrap().name, "reader");
        assert!(t.by_token("secret-u").is_none());
        assert!(
            t.by_token(&hash("secret-up")).is_none(),
            "the hash is not a token"
        );
        let id = t
            .by_identity(["example.com", "spiffe://cluster.local/ns/a/sa/worker"])
            .unwrap();
        assert_eq!(id.permissions, [Permission::Process]);
    }

    #[test]
    fn methods_need_their_permission_and_health_needs_none() {
        assert_eq!(required("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(
            required("/google.bytestream.ByteStream/Read"),
            Some(&[Permission::Read][..])
        );
        assert_eq!(
            required("/google.bytestream.ByteStream/QueryWriteStatus"),
            Some(&[Permission::Write][..])
        );
        assert_eq!(required("/x.Y/Z").map(<[_]>::len), Some(3));
        let t = table();
        let reader = t.by_token("secret-read").unwrap();
        assert!(reader.may(required("/google.bytestream.ByteStream/Read").unwrap()));
        assert!(!reader.may(required("/google.bytestream.ByteStream/Write").unwrap()));
    }

    #[test]
    fn bad_files_are_refused_without_quoting_secrets() {
        let e = Table::parse("[[tokens]]\nname = \"a\"\nsha256 = \"abc\"\npermissions = []\n")
            .unwrap_err();
        assert!(e.contains("64 hex"), "{e}");
        let e = Table::parse(&format!(
            "[[tokens]]\nname = \"a\"\nsha256 = \"{0}\"\npermissions = [\"read\"]\n\
             [[tokens]]\nname = \"a\"\nsha256 = \"{0}\"\npermissions = [\"read\"]\n",
            hash("x")
        ))
        .unwrap_err();
        assert!(e.contains("twice") && !e.contains(&hash("x")), "{e}");
        let e =
            Table::parse("[[tokens]]\nname = \"a\"\nsha256 = \"00\"\npermissions = [\"delete\"]\n")
                .unwrap_err();
        assert!(e.contains("delete"), "{e}");
        assert!(Table::parse("[[tokns]]\n").is_err());
    }

    /// `admin` is a permission of its own: files written before it existed
    /// parse as they did, and a full gRPC principal does not get it.
    #[test]
    fn admin_is_granted_only_where_listed() {
        let t = Table::parse(&format!(
            "[[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\npermissions = [\"admin\"]\n\
             [[tokens]]\nname = \"all\"\nsha256 = \"{}\"\npermissions = [\"read\", \"write\", \"process\"]\n",
            hash("ops-token"),
            hash("all-token")
        ))
        .unwrap();
        let ops = t.by_token("ops-token").unwrap();
        assert!(ops.may(&[Permission::Admin]));
        assert!(!ops.may(required("/google.bytestream.ByteStream/Read").unwrap()));
        let all = t.by_token("all-token").unwrap();
        assert!(all.may(required("/x.Y/Z").unwrap()));
        assert!(!all.may(&[Permission::Admin]));
    }

    #[test]
    fn admin_http_requests_are_checked_by_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(
            &path,
            format!(
                "[[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\npermissions = [\"admin\"]\n\
                 [[tokens]]\nname = \"reader\"\nsha256 = \"{}\"\npermissions = [\"read\"]\n",
                hash("ops-token"),
                hash("read-token")
            ),
        )
        .unwrap();
        let auth = Authorizer::new(&AuthConfig {
            enabled: true,
            tokens_file: path,
            ..AuthConfig::default()
        })
        .unwrap();
        let with = |v: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(v) = v {
                h.insert("authorization", v.parse().unwrap());
            }
            auth.check_bearer("/debug/pprof/heap", &[Permission::Admin], &h)
        };
        assert_eq!(&*with(Some("Bearer ops-token")).unwrap().name, "ops");
        let denied = with(Some("Bearer read-token")).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("reader"), "{denied:?}");
        for anon in [None, Some("Bearer nope"), Some("Basic b3Bz")] {
            assert_eq!(
                with(anon).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{anon:?}"
            );
        }
    }

    #[test]
    fn bearer_metadata_is_parsed_strictly() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h).unwrap(), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h).unwrap(), Some("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            h.insert("authorization", bad.parse().unwrap());
            assert!(bearer(&h).is_err(), "{bad}");
        }
    }
}
