//! The two S3 listings `object_store` does not make: ListMultipartUploads (the
//! multipart uploads still open under a prefix) and ListParts (the parts the
//! store acknowledged for one of them). Each request is presigned by
//! `object_store`'s own signer, so it carries the same credentials, endpoint
//! and addressing style as every other request, and is sent on a client built
//! from the same options (timeouts). The XML answers are read by pure
//! functions, tested below on what Garage and AWS send.

use std::time::Duration;

use bytes::Bytes;
use object_store::{
    aws::AmazonS3,
    client::{HttpClient, HttpRequestBody},
    path::Path,
    signer::{Method, SignedUrlOptions, Signer},
};
use serde::Deserialize;

/// How long a presigned listing URL is valid: it is sent at once.
const PRESIGNED_FOR: Duration = Duration::from_secs(300);

/// A multipart upload the store still holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OpenEntry {
    pub key: String,
    pub upload_id: String,
    /// When it was started, in milliseconds since the epoch.
    pub initiated_ms: i64,
}

/// A part the store acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PartEntry {
    pub number: u64,
    pub etag: String,
    pub size: u64,
    /// When it was stored, in milliseconds since the epoch.
    pub modified_ms: i64,
}

/// Every multipart upload open under `prefix` (a key prefix, e.g.
/// `memgate/uploads/`).
pub(super) async fn open_uploads(
    s3: &AmazonS3,
    http: &HttpClient,
    prefix: &str,
) -> object_store::Result<Vec<OpenEntry>> {
    let mut out = Vec::new();
    let mut marker: Option<(String, String)> = None;
    loop {
        let mut query = vec![("uploads", String::new()), ("prefix", prefix.to_owned())];
        if let Some((key, id)) = marker.take() {
            query.push(("key-marker", key));
            query.push(("upload-id-marker", id));
        }
        let body = get(s3, http, &Path::from(""), &query)
            .await?
            .ok_or_else(|| not_found(prefix, "the bucket"))?;
        let page = parse_uploads(&body)?;
        out.extend(page.entries);
        match page.next {
            Some(next) => marker = Some(next),
            None => return Ok(out),
        }
    }
}

/// The acknowledged parts of one upload, by part number; `None` if it is no
/// longer open (completed or aborted meanwhile).
pub(super) async fn parts(
    s3: &AmazonS3,
    http: &HttpClient,
    key: &Path,
    upload_id: &str,
) -> object_store::Result<Option<Vec<PartEntry>>> {
    let mut out = Vec::new();
    let mut marker: Option<u64> = None;
    loop {
        let mut query = vec![("uploadId", upload_id.to_owned())];
        if let Some(m) = marker.take() {
            query.push(("part-number-marker", m.to_string()));
        }
        let Some(body) = get(s3, http, key, &query).await? else {
            return Ok(None);
        };
        let page = parse_parts(&body)?;
        out.extend(page.entries);
        match page.next {
            Some(next) => marker = Some(next),
            None => {
                out.sort_by_key(|p| p.number);
                return Ok(Some(out));
            }
        }
    }
}

/// The parts numbered 1, 2, 3, ... up to the first gap, and their total size:
/// the prefix of the upload the store holds without a hole. A part after a
/// gap (its predecessor was never acknowledged) cannot be used.
pub(super) fn contiguous(parts: &[PartEntry]) -> (&[PartEntry], u64) {
    let n = parts
        .iter()
        .enumerate()
        .take_while(|(i, p)| p.number == *i as u64 + 1)
        .count();
    let prefix = &parts[..n];
    (prefix, prefix.iter().map(|p| p.size).sum())
}

/// A signed GET; the body of a 2xx answer, `None` for a 404.
async fn get(
    s3: &AmazonS3,
    http: &HttpClient,
    path: &Path,
    query: &[(&str, String)],
) -> object_store::Result<Option<Bytes>> {
    let opts = SignedUrlOptions::default()
        .with_query(query.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let url = s3
        .signed_url_opts(Method::GET, path, PRESIGNED_FOR, &opts)
        .await?;
    let request = http::Request::builder()
        .method(http::Method::GET)
        .uri(url.as_str())
        .body(HttpRequestBody::empty())
        .map_err(|e| generic(e.to_string()))?;
    let response = http
        .execute(request)
        .await
        .map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?;
    let status = response.status();
    let body = response
        .into_body()
        .bytes()
        .await
        .map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?;
    if status.is_success() {
        return Ok(Some(body));
    }
    let text = String::from_utf8_lossy(&body);
    let path = path.to_string();
    Err(match status.as_u16() {
        404 => return Ok(None),
        401 => object_store::Error::Unauthenticated {
            path,
            source: text.into_owned().into(),
        },
        403 => object_store::Error::PermissionDenied {
            path,
            source: text.into_owned().into(),
        },
        // The same words object_store uses, which `errors::kind_of` reads.
        _ => generic(format!(
            "Server returned non-2xx status code: {status}: {text}"
        )),
    })
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3",
        source: message.into(),
    }
}

fn not_found(path: &str, what: &str) -> object_store::Error {
    object_store::Error::NotFound {
        path: path.to_owned(),
        source: format!("{what} answered 404").into(),
    }
}

/// One page of a listing and where the next one starts.
#[derive(Debug)]
struct Page<T, M> {
    entries: Vec<T>,
    next: Option<M>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadsXml {
    #[serde(default, rename = "Upload")]
    uploads: Vec<UploadXml>,
    #[serde(default)]
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_upload_id_marker: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadXml {
    key: String,
    upload_id: String,
    initiated: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PartsXml {
    #[serde(default, rename = "Part")]
    parts: Vec<PartXml>,
    #[serde(default)]
    is_truncated: bool,
    next_part_number_marker: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PartXml {
    part_number: u64,
    #[serde(rename = "ETag")]
    etag: String,
    size: u64,
    last_modified: String,
}

fn parse_uploads(body: &[u8]) -> object_store::Result<Page<OpenEntry, (String, String)>> {
    let xml: UploadsXml = parse(body, "ListMultipartUploads")?;
    let entries = xml
        .uploads
        .into_iter()
        .map(|u| {
            Ok(OpenEntry {
                initiated_ms: millis(&u.initiated)?,
                key: u.key,
                upload_id: u.upload_id,
            })
        })
        .collect::<object_store::Result<_>>()?;
    let next = match (
        xml.is_truncated,
        xml.next_key_marker,
        xml.next_upload_id_marker,
    ) {
        (true, Some(key), Some(id)) => Some((key, id)),
        (true, ..) => {
            return Err(generic(
                "ListMultipartUploads: truncated without markers".into(),
            ));
        }
        (false, ..) => None,
    };
    Ok(Page { entries, next })
}

fn parse_parts(body: &[u8]) -> object_store::Result<Page<PartEntry, u64>> {
    let xml: PartsXml = parse(body, "ListParts")?;
    let entries = xml
        .parts
        .into_iter()
        .map(|p| {
            Ok(PartEntry {
                number: p.part_number,
                modified_ms: millis(&p.last_modified)?,
                etag: p.etag,
                size: p.size,
            })
        })
        .collect::<object_store::Result<_>>()?;
    let next = match (xml.is_truncated, xml.next_part_number_marker) {
        (true, Some(m)) => Some(m),
        (true, None) => return Err(generic("ListParts: truncated without a marker".into())),
        (false, _) => None,
    };
    Ok(Page { entries, next })
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> object_store::Result<T> {
    let text = std::str::from_utf8(body).map_err(|e| generic(format!("{what}: {e}")))?;
    quick_xml::de::from_str(text).map_err(|e| generic(format!("{what}: unreadable answer: {e}")))
}

/// An S3 timestamp (RFC 3339, e.g. `2026-12-04T18:39:24.804Z`) in milliseconds.
fn millis(text: &str) -> object_store::Result<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| generic(format!("timestamp {text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Garage 2.5 answered (captured with curl against `garage server`).
    const GARAGE_UPLOADS: &str = r#"<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>memgate</Bucket><Prefix>up/</Prefix><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated><Upload><Initiated>2026-12-04T18:39:24.645Z</Initiated><Initiator><DisplayName>Dummy Key</DisplayName><ID>GKDummyKey</ID></Initiator><Key>up/a/1</Key><UploadId>9c7bd4fe29766fa76be81d7ed2bea0f3f0ebd0e0841f296034e32e36770a0cb8</UploadId><Owner><DisplayName>Dummy Key</DisplayName><ID>GKDummyKey</ID></Owner><StorageClass>STANDARD</StorageClass></Upload></ListMultipartUploadsResult>"#;
    const GARAGE_PARTS: &str = r#"<?xml version="1.0" encoding="UTF-8"?><ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>memgate</Bucket><Key>up/a/1</Key><UploadId>9c7b</UploadId><MaxParts>1000</MaxParts><IsTruncated>false</IsTruncated><Part><ETag>&quot;843f141d92ddae53516df6337740af10&quot;</ETag><LastModified>2026-12-04T18:39:24.804Z</LastModified><PartNumber>1</PartNumber><Size>6000000</Size></Part><Initiator><DisplayName>Dummy Key</DisplayName><ID>GKDummyKey</ID></Initiator><Owner><DisplayName>Dummy Key</DisplayName><ID>GKDummyKey</ID></Owner><StorageClass>STANDARD</StorageClass></ListPartsResult>"#;
    /// AWS's documented examples, truncated pages.
    const AWS_UPLOADS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>bucket</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>my-movie.m2ts</NextKeyMarker>
  <NextUploadIdMarker>YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ</NextUploadIdMarker>
  <MaxUploads>3</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>my-divisor</Key><UploadId>XMgbGlrZSBlbHZpbmcncyBub3QgaGF2aW5nIG11Y2ggbHVjaw</UploadId>
    <StorageClass>STANDARD</StorageClass><Initiated>2010-11-10T20:48:33.000Z</Initiated></Upload>
  <Upload><Key>my-movie.m2ts</Key><UploadId>VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
    <StorageClass>STANDARD</StorageClass><Initiated>2010-11-10T20:48:33.000Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
    const AWS_PARTS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>example-bucket</Bucket><Key>example-object</Key><UploadId>XXBsb2FkIElEIGZvciBlbHZpbmcncyVcdS1tb3ZpZS5tMnRzEEEwbG9hZA</UploadId>
  <PartNumberMarker>1</PartNumberMarker><NextPartNumberMarker>3</NextPartNumberMarker>
  <MaxParts>2</MaxParts><IsTruncated>true</IsTruncated>
  <Part><PartNumber>2</PartNumber><LastModified>2010-11-10T20:48:34.000Z</LastModified>
    <ETag>"7778aef83f66abc1fa1e8477f296d394"</ETag><Size>10485760</Size></Part>
  <Part><PartNumber>3</PartNumber><LastModified>2010-11-10T20:48:33.000Z</LastModified>
    <ETag>"aaaa18db4cc2f85cedef654fccc4a4x8"</ETag><Size>10485760</Size></Part>
</ListPartsResult>"#;
    const EMPTY_UPLOADS: &str = r#"<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>memgate</Bucket><Prefix>x/</Prefix><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>"#;

    #[test]
    fn multipart_upload_listings_are_read_with_their_markers() {
        let page = parse_uploads(GARAGE_UPLOADS.as_bytes()).unwrap();
        assert_eq!(
            page.entries,
            [OpenEntry {
                key: "up/a/1".into(),
                upload_id: "9c7bd4fe29766fa76be81d7ed2bea0f3f0ebd0e0841f296034e32e36770a0cb8"
                    .into(),
                initiated_ms: 1_796_409_564_645,
            }]
        );
        assert!(page.next.is_none());

        let page = parse_uploads(AWS_UPLOADS.as_bytes()).unwrap();
        assert_eq!(page.entries.len(), 2);
        assert_eq!(page.entries[1].key, "my-movie.m2ts");
        assert_eq!(
            page.next,
            Some((
                "my-movie.m2ts".into(),
                "YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ".into()
            ))
        );

        assert!(
            parse_uploads(EMPTY_UPLOADS.as_bytes())
                .unwrap()
                .entries
                .is_empty()
        );
    }

    #[test]
    fn part_listings_are_read_with_their_markers() {
        let page = parse_parts(GARAGE_PARTS.as_bytes()).unwrap();
        assert_eq!(
            page.entries,
            [PartEntry {
                number: 1,
                etag: "\"843f141d92ddae53516df6337740af10\"".into(),
                size: 6_000_000,
                modified_ms: 1_796_409_564_804,
            }]
        );
        assert!(page.next.is_none());

        let page = parse_parts(AWS_PARTS.as_bytes()).unwrap();
        assert_eq!(
            page.entries.iter().map(|p| p.number).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(page.next, Some(3));
    }

    #[test]
    fn broken_listings_are_errors_not_empty_lists() {
        for body in [
            "not xml",
            "<ListPartsResult><Part><PartNumber>x</PartNumber></Part></ListPartsResult>",
            "<ListPartsResult><IsTruncated>true</IsTruncated></ListPartsResult>",
        ] {
            assert!(parse_parts(body.as_bytes()).is_err(), "{body}");
        }
        let bad_time = GARAGE_UPLOADS.replace("2026-12-04T18:39:24.645Z", "yesterday");
        assert!(parse_uploads(bad_time.as_bytes()).is_err());
    }

    #[test]
    fn only_the_parts_before_the_first_gap_count() {
        let part = |number, size| PartEntry {
            number,
            etag: format!("e{number}"),
            size,
            modified_ms: 0,
        };
        let cases: [(&[u64], usize, u64); 6] = [
            (&[], 0, 0),
            (&[1], 1, 8),
            (&[1, 2, 3], 3, 24),
            (&[1, 2, 4, 5], 2, 16),
            (&[2, 3], 0, 0),
            (&[1, 3], 1, 8),
        ];
        for (numbers, n, size) in cases {
            let parts: Vec<PartEntry> = numbers.iter().map(|&i| part(i, 8)).collect();
            let (prefix, total) = contiguous(&parts);
            assert_eq!((prefix.len(), total), (n, size), "{numbers:?}");
        }
        // Sizes are the parts' own, not assumed equal: the last one may be short.
        let parts = [part(1, 8), part(2, 3)];
        assert_eq!(contiguous(&parts).1, 11);
    }
}
