//! gRPC server reflection: what `grpcurl list` asks, answered without proto files.

use std::time::Duration;

use memgate::config::Config;
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn reflection_lists_every_service() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.storage.data_dir = data.path().to_path_buf();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        memgate::server::serve(&cfg, listener, async {
            let _ = stopped.await;
        })
        .await
    });
    let channel = memgate::client::connect(&format!("http://{addr}"))
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "google.bytestream.ByteStream",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "memgate.v1.Payload",
        ]
    );
    drop(answers);
    drop(client);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
