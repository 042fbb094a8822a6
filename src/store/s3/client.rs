//! The `object_store` S3 client as `[storage.s3]` configures it.

use std::sync::Arc;

use object_store::{
    ClientOptions, RetryConfig,
    aws::AmazonS3Builder,
    client::{HttpClient, HttpConnector, ReqwestConnector},
};

use super::credentials;
use crate::config::S3Config;

/// Timeouts and transport for every request to the store, `object_store`'s
/// own and the listings it does not make (see `listing.rs`).
fn client_options(s3: &S3Config) -> ClientOptions {
    ClientOptions::new()
        .with_timeout(s3.request_timeout)
        .with_connect_timeout(s3.connect_timeout)
        .with_allow_http(s3.endpoint.starts_with("http://"))
}

/// An HTTP client with the same options as `object_store`'s.
pub(super) fn http_client(s3: &S3Config) -> object_store::Result<HttpClient> {
    ReqwestConnector::default().connect(&client_options(s3))
}

pub(super) fn builder(s3: &S3Config) -> AmazonS3Builder {
    // The standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    // AWS_SESSION_TOKEN, web identity for IRSA, ...) first; the config file wins
    // for everything it sets. Credentials never come from the config file.
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_virtual_hosted_style_request(!s3.path_style)
        .with_client_options(client_options(s3))
        .with_retry(RetryConfig {
            max_retries: s3.max_retries,
            retry_timeout: s3.retry_timeout,
            ..RetryConfig::default()
        });
    if !s3.endpoint.is_empty() {
        b = b.with_endpoint(&s3.endpoint);
    }
    if !s3.credentials_file.as_os_str().is_empty() {
        b = b.with_credentials(Arc::new(credentials::FileCredentials::new(
            s3.credentials_file.clone(),
            s3.profile.clone(),
        )));
    }
    b
}

/// `memgate/` from `memgate`, `/memgate/` or `memgate/`; empty stays empty.
pub(super) fn normalise_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised_to_end_with_one_slash() {
        assert_eq!(normalise_prefix(""), "");
        assert_eq!(normalise_prefix("/"), "");
        assert_eq!(normalise_prefix("memgate"), "memgate/");
        assert_eq!(normalise_prefix("/a/b/"), "a/b/");
    }
}
