//! The admin listener answers plain HTTP honestly (the real binary, a real HTTP
//! client): unknown paths are 404 and wrong methods 405, so a probe or scraper
//! pointed at a typo fails; gRPC requests still get gRPC answers, UNIMPLEMENTED
//! for a method the listener does not serve.

mod support;

use memgate::proto::bytestream::{ReadRequest, byte_stream_client::ByteStreamClient};
use reqwest::StatusCode;
use support::process::Memgate;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn unknown_paths_are_404_for_http_and_unimplemented_for_grpc() {
    let m = Memgate::start("");
    let base = format!("http://{}", m.admin);
    let http = client();

    // The paths the listener serves still answer 200.
    for path in ["/livez", "/readyz", "/metrics"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // Typos and other servers' conventions: 404 with a body naming what exists.
    for path in [
        "/readz",
        "/healthz",
        "/",
        "/metrics/",
        "/livez/x",
        "/debug/pprof/",
        "/grpc.health.v1.Health",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(
            r.headers().get("grpc-status").is_none(),
            "{path}: {:?}",
            r.headers()
        );
        let body = r.text().await.unwrap();
        assert!(
            body.contains("/livez") && body.contains(path),
            "{path}: {body}"
        );
    }
    // HEAD, which probes and load balancers also send, follows GET.
    let r = http.head(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A gRPC client on the admin port: health answers, other services are
    // UNIMPLEMENTED (a gRPC status, not an HTTP error).
    let channel = tonic::transport::Endpoint::from_shared(base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);
    let read = ByteStreamClient::new(channel)
        .read(ReadRequest {
            resource_name: "blobs/00/1".into(),
            read_offset: 0,
            read_limit: 0,
        })
        .await;
    let status = support::expect_code(read, tonic::Code::Unimplemented, "Read on the admin port");
    assert!(
        status.message().contains("grpc.health.v1.Health"),
        "{status:?}"
    );
}

#[tokio::test]
async fn wrong_methods_are_405_and_plain_http_on_grpc_paths_is_refused() {
    let m = Memgate::start("");
    let base = format!("http://{}", m.admin);
    let http = client();

    for path in [
        "/livez",
        "/readyz",
        "/metrics",
        "/debug/pprof/heap",
        "/debug/pprof/heap.svg",
    ] {
        for method in [
            reqwest::Method::POST,
            reqwest::Method::PUT,
            reqwest::Method::DELETE,
        ] {
            let r = http
                .request(method.clone(), format!("{base}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            let allow = r
                .headers()
                .get("allow")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            assert!(allow.contains("GET"), "{method} {path}: Allow {allow}");
        }
    }
    // The gRPC health method over plain HTTP: gRPC is POST with a gRPC content
    // type, so GET is 405 and a POST of something else 415, never a 200.
    let check = format!("{base}/grpc.health.v1.Health/Check");
    let r = http.get(&check).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers().get("allow").unwrap(), "POST");
    let r = http
        .post(&check)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(r.text().await.unwrap().contains("application/grpc"));
}
