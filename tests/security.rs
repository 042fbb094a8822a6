//! Who gets in, against the real binary: TLS with the served certificate,
//! mutual TLS refusing an untrusted client certificate and authorising a
//! listed one, certificates rotated on disk while an upload on an existing
//! connection completes (and a broken rotation refused), bearer tokens
//! (missing, unknown, insufficient: the right codes, nothing reserved, no
//! token in the log), and the kubelet's probes answering on the plaintext
//! admin listener with TLS and auth on.

mod support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use memgate::proto::bytestream::{WriteRequest, byte_stream_client::ByteStreamClient};
use sha2::{Digest as _, Sha256};
use support::{
    pki::{Ca, Pem},
    process::Memgate,
    *,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const MIB: usize = 1 << 20;
const UPLOADER: &str = "token-of-the-uploader";
const READER: &str = "token-of-the-reader";
const WORKER: &str = "spiffe://cluster.local/ns/build/sa/worker";

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A tokens file: an uploader (read, write), a reader (read), and the mTLS
/// identity WORKER (read, write).
fn tokens_file(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\nname = \"uploader\"\nsha256 = \"{}\"\npermissions = [\"read\", \"write\"]\n\
             [[tokens]]\nname = \"reader\"\nsha256 = \"{}\"\npermissions = [\"read\"]\n\
             [[identities]]\nname = \"{WORKER}\"\npermissions = [\"read\", \"write\"]\n",
            sha(UPLOADER),
            sha(READER)
        ),
    )
    .expect("tokens file");
    path
}

/// Writes the server's certificate files (and the client CA, for mTLS).
fn write_tls(dir: &Path, server: &Pem, client_ca: Option<&Ca>) {
    std::fs::write(dir.join("server.crt"), &server.cert).expect("cert");
    std::fs::write(dir.join("server.key"), &server.key).expect("key");
    if let Some(ca) = client_ca {
        std::fs::write(dir.join("client-ca.crt"), &ca.pem).expect("client ca");
    }
}

fn config(dir: &Path, mtls: bool, auth: bool) -> String {
    let mut c = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nreload_interval = \"100ms\"\n",
        dir.join("server.crt"),
        dir.join("server.key")
    );
    if mtls {
        c += &format!("client_ca_file = {:?}\n", dir.join("client-ca.crt"));
    }
    if auth {
        c += &format!(
            "[auth]\nenabled = true\ntokens_file = {:?}\nreload_interval = \"100ms\"\n",
            tokens_file(dir)
        );
    }
    c
}

fn start(dir: tempfile::TempDir, mtls: bool, auth: bool) -> Memgate {
    let cfg = config(dir.path(), mtls, auth);
    Memgate::start_in(dir, &cfg)
}

fn port(m: &Memgate) -> u16 {
    m.grpc.rsplit(':').next().unwrap().parse().unwrap()
}

/// A TLS channel trusting `ca`, presenting `identity` if given.
async fn tls_channel(m: &Memgate, ca: &str, identity: Option<&Pem>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Endpoint::from_shared(format!("https://localhost:{}", port(m)))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn check(channel: Channel, service: &str) -> Result<i32, tonic::Status> {
    Ok(HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .status)
}

/// Adds the bearer token (if any) to every call.
type TokenInterceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type TokenClient =
    ByteStreamClient<tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>>;

/// A ByteStream client whose every call carries `token` (if any).
fn with_token(channel: Channel, token: Option<&str>) -> TokenClient {
    let header: Option<MetadataValue<_>> = token.map(|t| format!("Bearer {t}").parse().unwrap());
    let intercept: TokenInterceptor = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    ByteStreamClient::with_interceptor(channel, intercept).max_decoding_message_size(64 * MIB)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_its_certificate_and_refuses_plaintext() {
    let ca = Ca::new("memgate test CA");
    let dir = tempfile::tempdir().unwrap();
    write_tls(dir.path(), &ca.server(), None);
    let m = start(dir, false, false);
    let channel = tls_channel(&m, &ca.pem, None).await.expect("TLS handshake");
    assert_eq!(check(channel.clone(), "").await.expect("Check over TLS"), 1);
    // A real call over TLS.
    let data = payload(3 * MIB + 1, 1);
    let mut client = bytestream(channel);
    assert_eq!(
        upload(&mut client, &data).await.expect("upload"),
        data.len() as i64
    );
    // A client that trusts another CA refuses the server.
    let other = Ca::new("someone else");
    assert!(tls_channel(&m, &other.pem, None).await.is_err());
    // Plaintext HTTP/2 to the TLS port gets nowhere.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", port(&m)))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    assert!(check(plain, "").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_untrusted_clients_and_authorises_listed_identities() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    write_tls(dir.path(), &server_ca.server(), Some(&client_ca));
    let m = start(dir, true, true);

    // No client certificate, or one from a CA the server does not trust: the
    // handshake (or the first call on it, TLS 1.3 reports it late) fails.
    for identity in [None, Some(Ca::new("rogue CA").client(WORKER, "worker"))] {
        let refused = match tls_channel(&m, &server_ca.pem, identity.as_ref()).await {
            Err(_) => true,
            Ok(channel) => check(channel, "").await.is_err(),
        };
        assert!(refused, "a client without a trusted certificate got in");
    }

    // A trusted certificate whose identity is listed: authorised by it, no token.
    let worker = client_ca.client(WORKER, "worker");
    let channel = tls_channel(&m, &server_ca.pem, Some(&worker))
        .await
        .expect("mTLS handshake");
    let data = payload(2 * MIB + 5, 2);
    let mut client = with_token(channel.clone(), None);
    let committed = upload(&mut client, &data)
        .await
        .expect("upload as the worker");
    assert_eq!(committed, data.len() as i64);
    // Trusted but not listed: authenticated by TLS, unknown to authorization.
    let stranger = client_ca.client("spiffe://cluster.local/ns/x/sa/stranger", "stranger");
    let channel = tls_channel(&m, &server_ca.pem, Some(&stranger))
        .await
        .expect("handshake");
    let s = upload(&mut with_token(channel, None), &data)
        .await
        .expect_err("an unlisted identity");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("stranger"), "{s:?}");
    // The log names the caller by its identity.
    assert!(
        m.log().contains(WORKER),
        "access log should name the identity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_picked_up_while_an_upload_on_an_old_connection_completes() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().to_path_buf();
    write_tls(&files, &old_ca.server(), None);
    let m = start(dir, false, false);

    // An upload on a connection made with the old certificate, half sent.
    let channel = tls_channel(&m, &old_ca.pem, None)
        .await
        .expect("old handshake");
    let data = payload(16 * MIB, 3);
    let d = digest(&data);
    let name = write_name(&d);
    let (tx, rx) = mpsc::channel::<WriteRequest>(2);
    let mut writer = bytestream(channel);
    let call = tokio::spawn(async move { writer.write(ReceiverStream::new(rx)).await });
    let mut requests = write_requests(&name, &data, 0, MIB, true).into_iter();
    for r in requests.by_ref().take(8) {
        tx.send(r).await.expect("first half");
    }

    // Rotate: new certificate and key, in place.
    write_tls(&files, &new_ca.server(), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tls_channel(&m, &new_ca.pem, None).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "rotation never picked up:\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tls_channel(&m, &old_ca.pem, None).await.is_err(),
        "new connections get the new certificate"
    );

    // The old connection's upload completes.
    for r in requests {
        tx.send(r).await.expect("second half");
    }
    drop(tx);
    let resp = call.await.unwrap().expect("upload across the rotation");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);

    // A broken rotation (a key that does not match) is refused; the working
    // certificate stays.
    std::fs::write(files.join("server.key"), Ca::new("x").server().key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !m.log().contains("new TLS files rejected") {
        assert!(
            Instant::now() < deadline,
            "broken files not noticed:\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = tls_channel(&m, &new_ca.pem, None)
        .await
        .expect("still serving the last good certificate");
    assert_eq!(
        read_digest(&mut bytestream(channel), &d.read_name())
            .await
            .expect("Read"),
        d
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_anything_is_reserved_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[auth]\nenabled = true\ntokens_file = {:?}\n",
        tokens_file(dir.path())
    );
    let m = Memgate::start_in(dir, &cfg);
    let channel = Endpoint::from_shared(m.grpc.clone())
        .unwrap()
        .connect_lazy();
    let data = payload(MIB, 4);
    let admitted = || m.metric("memgate_admission_admitted_total", &[]);

    for (token, code, what) in [
        (None, Code::Unauthenticated, "no token"),
        (
            Some("not-a-token"),
            Code::Unauthenticated,
            "an unknown token",
        ),
        (
            Some(READER),
            Code::PermissionDenied,
            "a read-only token writing",
        ),
    ] {
        let s = upload(&mut with_token(channel.clone(), token), &data)
            .await
            .expect_err(what);
        assert_eq!(s.code(), code, "{what}: {s:?}");
    }
    // A huge unary call without credentials is refused from its headers alone.
    let mut process =
        memgate::proto::memgate_v1::payload_client::PayloadClient::new(channel.clone())
            .max_encoding_message_size(256 * MIB);
    let s = process
        .process(memgate::proto::memgate_v1::ProcessRequest {
            data: Bytes::from(vec![0u8; 100 * MIB]),
            echo: false,
        })
        .await
        .expect_err("Process without a token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(admitted().await, 0.0, "refused calls reserved memory");

    // The uploader writes; the reader reads; both by name in the log.
    let committed = upload(&mut with_token(channel.clone(), Some(UPLOADER)), &data)
        .await
        .expect("upload with the uploader's token");
    assert_eq!(committed, data.len() as i64);
    let d = digest(&data);
    let got = read(
        &mut with_token(channel.clone(), Some(READER)),
        &d.read_name(),
        0,
        0,
    )
    .await
    .expect("read with the reader's token");
    assert!(got == data);
    assert!(admitted().await >= 2.0);
    let log = m.log();
    assert!(log.contains("\"client\":\"uploader\"") && log.contains("\"client\":\"reader\""));
    for secret in [UPLOADER, READER, "not-a-token"] {
        assert!(!log.contains(secret), "a token reached the log");
    }
    let (_, metrics) = m.http("/metrics").await;
    assert!(!metrics.contains(UPLOADER) && !metrics.contains(READER));
    // Health needs no token.
    assert_eq!(
        check(channel, "readiness")
            .await
            .expect("health without a token"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_on_the_plaintext_admin_listener_with_tls_and_auth_on() {
    let ca = Ca::new("memgate test CA");
    let dir = tempfile::tempdir().unwrap();
    write_tls(dir.path(), &ca.server(), Some(&ca));
    let m = start(dir, true, true);
    // The kubelet's native gRPC probe: plaintext h2c to the admin port.
    let admin = Endpoint::from_shared(format!("http://{}", m.admin))
        .unwrap()
        .connect()
        .await
        .expect("plaintext HTTP/2 to the admin port");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check(admin.clone(), "readiness")
            .await
            .expect("Check on the admin port")
            == 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(check(admin.clone(), "").await.unwrap(), 1);
    // And HTTP/1.1 probes on the same port.
    assert_eq!(m.http("/livez").await.0, 200);
    assert_eq!(m.http("/readyz").await.0, 200);
    // The CLI's health command against it (what `helm test` runs).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memgate"))
        .args([
            "health",
            "--addr",
            &format!("http://{}", m.admin),
            "--service",
            "readiness",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
}

/// The grpcio client's interpreter, installed by `scripts/interop-venv.sh`
/// (which `scripts/test.sh` runs first).
fn interop_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/interop-venv.sh (scripts/test.sh does)",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_works_over_mutual_tls_with_a_token() {
    let python = interop_python();
    let ca = Ca::new("memgate test CA");
    let dir = tempfile::tempdir().unwrap();
    write_tls(dir.path(), &ca.server(), Some(&ca));
    let client = ca.client("spiffe://cluster.local/ns/py/sa/client", "grpcio");
    let certs = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = certs.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca_file, cert, key) = (
        file("ca.crt", &ca.pem),
        file("client.crt", &client.cert),
        file("client.key", &client.key),
    );
    let m = start(dir, true, true);
    let out = tokio::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/grpcio_client.py"))
        .arg("--target")
        .arg(format!("127.0.0.1:{}", port(&m)))
        .arg("--ca")
        .arg(&ca_file)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["--token", UPLOADER])
        .output()
        .await
        .expect("run the grpcio client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed: {stdout}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(seen["health"], "SERVING");
    assert_eq!(seen["wrong_token"], "UNAUTHENTICATED");
    assert_eq!(seen["read_back_equal"], true);
}
