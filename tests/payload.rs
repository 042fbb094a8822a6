//! `memgate.v1.Payload/Process` against a real in-process server on `127.0.0.1:0`:
//! hash and size with and without echo, a 150 MB payload, the empty payload, the
//! message size limit and gzip-compressed requests.

mod support;

use bytes::Bytes;
use memgate::proto::memgate_v1::{ProcessRequest, payload_client::PayloadClient};
use sha2::{Digest as _, Sha256};
use support::*;
use tonic::{Code, codec::CompressionEncoding, transport::Channel};

const BIG: usize = 150 * 1000 * 1000;

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn client(channel: Channel) -> PayloadClient<Channel> {
    PayloadClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_without_echo_returns_hash_and_size_only() {
    let server = TestServer::start(|_| {}).await;
    let data = payload(3 * 1024 * 1024 + 11, 1);
    let resp = memgate::client::process(server.channel(), data.clone(), false)
        .await
        .expect("Process");
    assert_eq!(resp.sha256, sha256_hex(&data));
    assert_eq!(resp.sha256.len(), 64);
    assert!(
        !resp.sha256.chars().any(|c| c.is_ascii_uppercase()),
        "hex must be lowercase"
    );
    assert_eq!(resp.size, data.len() as u64);
    assert!(
        resp.data.is_empty(),
        "no echo asked, {} bytes came back",
        resp.data.len()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_with_echo_returns_the_payload() {
    let server = TestServer::start(|_| {}).await;
    let data = payload(3 * 1024 * 1024 + 11, 2);
    let resp = memgate::client::process(server.channel(), data.clone(), true)
        .await
        .expect("Process");
    assert_eq!(resp.sha256, sha256_hex(&data));
    assert_eq!(resp.size, data.len() as u64);
    assert!(resp.data == data, "echoed data differs");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_of_a_150mb_payload_with_echo() {
    let server = TestServer::start(|_| {}).await;
    let data = payload(BIG, 3);
    let want = sha256_hex(&data);
    let resp = memgate::client::process(server.channel(), data.clone(), true)
        .await
        .expect("Process");
    assert_eq!(resp.sha256, want);
    assert_eq!(resp.size, BIG as u64);
    assert_eq!(resp.data.len(), BIG);
    assert!(resp.data == data, "echoed data differs");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_of_an_empty_payload() {
    let server = TestServer::start(|_| {}).await;
    for echo in [false, true] {
        let resp = memgate::client::process(server.channel(), Bytes::new(), echo)
            .await
            .expect("Process");
        assert_eq!(
            resp.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(resp.size, 0);
        assert!(resp.data.is_empty());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_over_max_message_size_is_out_of_range() {
    const MAX: u64 = 64 * 1024;
    let server =
        TestServer::start(|c| c.server.max_message_size = bytesize::ByteSize::b(MAX)).await;
    let channel = server.channel();

    let data = payload(MAX as usize + 1, 4);
    let status = expect_code(
        memgate::client::process(channel.clone(), data, false).await,
        Code::OutOfRange,
        "Process over server.max_message_size",
    );
    // tonic's message gives the encoded size (payload + protobuf framing) and the limit.
    assert!(
        status.message().contains("too large"),
        "{:?}",
        status.message()
    );
    assert!(
        status.message().contains(&MAX.to_string()),
        "should give the limit: {:?}",
        status.message()
    );

    // The connection and the server are fine afterwards; a message that fits passes.
    let data = payload(MAX as usize - 64, 5);
    let resp = memgate::client::process(channel, data.clone(), true)
        .await
        .expect("Process under the limit");
    assert_eq!(resp.sha256, sha256_hex(&data));
    assert!(resp.data == data);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_compressed_request_is_accepted() {
    let server = TestServer::start(|_| {}).await;
    // Half random, half zeros: compressible, but not trivially.
    let mut raw = payload(2 * 1024 * 1024, 6).to_vec();
    raw.extend(std::iter::repeat_n(0u8, 2 * 1024 * 1024));
    let data = Bytes::from(raw);
    let mut client = client(server.channel()).send_compressed(CompressionEncoding::Gzip);
    let resp = client
        .process(ProcessRequest {
            data: data.clone(),
            echo: true,
        })
        .await
        .expect("compressed Process")
        .into_inner();
    assert_eq!(resp.sha256, sha256_hex(&data));
    assert_eq!(resp.size, data.len() as u64);
    assert!(resp.data == data, "echo of a compressed request differs");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_request_that_inflates_past_max_message_size_is_resource_exhausted() {
    const MAX: u64 = 64 * 1024;
    let server =
        TestServer::start(|c| c.server.max_message_size = bytesize::ByteSize::b(MAX)).await;
    // 8 MiB of zeros compress to a few KiB: under the limit on the wire, far over it inflated.
    let data = Bytes::from(vec![0u8; 8 * 1024 * 1024]);
    let mut client = client(server.channel()).send_compressed(CompressionEncoding::Gzip);
    let status = expect_code(
        client.process(ProcessRequest { data, echo: false }).await,
        Code::ResourceExhausted,
        "gzip bomb",
    );
    assert!(
        status.message().contains(&MAX.to_string()),
        "should give the limit: {:?}",
        status.message()
    );

    // The server is fine afterwards.
    let data = payload(1000, 7);
    let resp = client
        .process(ProcessRequest {
            data: data.clone(),
            echo: false,
        })
        .await
        .expect("compressed Process under the limit")
        .into_inner();
    assert_eq!(resp.sha256, sha256_hex(&data));
    server.stop().await;
}
