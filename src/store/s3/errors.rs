//! Object-store errors sorted into what a client can act on, for the status
//! it gets and for the metrics' outcome label.

use crate::store::StoreError;

/// The metric outcome of an object-store error.
pub(super) fn outcome_of(e: &object_store::Error) -> &'static str {
    match kind_of(e) {
        Kind::NotFound => "not_found",
        Kind::Unavailable => "unavailable",
        Kind::Throttled => "throttled",
        Kind::Denied => "denied",
        Kind::Other => "error",
    }
}

enum Kind {
    NotFound,
    Unavailable,
    Throttled,
    Denied,
    Other,
}

fn kind_of(e: &object_store::Error) -> Kind {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => return Kind::NotFound,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => return Kind::Denied,
        _ => {}
    }
    // object_store keeps the HTTP status in a type it does not export; its
    // message is stable ("... status code: 503 Service Unavailable ..."). A
    // transport error (refused, reset, timed out) is an HttpError in the chain.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return Kind::Unavailable;
        }
        source = s.source();
    }
    let text = e.to_string();
    if text.contains("SlowDown") {
        return Kind::Throttled;
    }
    match status_in(&text) {
        Some(429) => Kind::Throttled,
        Some(500..=599) => Kind::Unavailable,
        _ => Kind::Other,
    }
}

/// The HTTP status in an object_store error message, if it names one.
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// An object-store error as a [`StoreError`] a client can act on. The full
/// error goes to the log; a denial's detail never reaches the client.
pub(super) fn classify(context: &str, e: object_store::Error) -> StoreError {
    let context = context.to_owned();
    match kind_of(&e) {
        Kind::Unavailable => {
            tracing::warn!(error = %e, "object store unavailable while {context}");
            StoreError::Unavailable {
                context,
                detail: short(&e),
            }
        }
        Kind::Throttled => {
            tracing::warn!(error = %e, "object store throttling while {context}");
            StoreError::Throttled { context }
        }
        Kind::Denied => {
            tracing::error!(error = %e, "object store denied access while {context}");
            StoreError::Denied { context }
        }
        Kind::NotFound | Kind::Other => {
            tracing::error!(error = %e, "object store error while {context}");
            StoreError::Backend {
                context,
                detail: short(&e),
            }
        }
    }
}

/// The innermost cause of an error, which says what happened without the
/// request details (URLs, retry counts) of the outer layers.
fn short(e: &object_store::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_read_from_object_store_messages() {
        let msg = "Generic S3 error: Error performing PUT http://x/b/k in 1s - Server returned non-2xx status code: 503 Service Unavailable: <Error>";
        assert_eq!(status_in(msg), Some(503));
        assert_eq!(status_in("status code: 42"), None);
        assert_eq!(status_in("no status here"), None);
    }

    #[test]
    fn object_store_errors_map_to_what_a_client_can_act_on() {
        let generic = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        };
        let path = || "blobs/x".to_string();
        let cases = [
            (
                generic(
                    "Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>",
                ),
                "throttled",
            ),
            (
                generic("Server returned non-2xx status code: 429 Too Many Requests"),
                "throttled",
            ),
            (
                generic("Server returned non-2xx status code: 500 Internal Server Error"),
                "unavailable",
            ),
            (
                generic("Server returned non-2xx status code: 400 Bad Request"),
                "error",
            ),
            (
                object_store::Error::PermissionDenied {
                    path: path(),
                    source: "SignatureDoesNotMatch".into(),
                },
                "denied",
            ),
            (
                object_store::Error::Unauthenticated {
                    path: path(),
                    source: "InvalidAccessKeyId".into(),
                },
                "denied",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(outcome_of(&e), want, "{e}");
            let mapped = classify("uploading a part", e);
            let kind = match mapped {
                StoreError::Throttled { .. } => "throttled",
                StoreError::Unavailable { .. } => "unavailable",
                StoreError::Denied { .. } => "denied",
                StoreError::Backend { .. } => "error",
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(kind, want);
        }
    }
}
