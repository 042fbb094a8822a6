//! `memgate::api::resource`: ByteStream resource names come straight from clients.
//!
//! Input: any bytes, read as UTF-8 (lossily converted when invalid, since tonic
//! hands the parsers a `String`). Both parsers run on every input.
//!
//! Invariants of a successful parse:
//! - the name is at most `MAX_NAME_LEN` bytes;
//! - the hash is 64 lowercase hex digits and the size at most `i64::MAX`;
//! - `digest.read_name()` re-parses to the same digest, and the canonical name
//!   (instance, uuid, hash, size without leading zeros) re-parses to the same value;
//! - the input differs from that canonical name at most by leading zeros of the
//!   size: the parser normalises nothing else;
//! - instance and upload id hold only their allowed characters;
//! - no name is both a read name and a write name.

use memgate::api::resource::{
    Digest, MAX_NAME_LEN, ReadName, WriteName, parse_read_name, parse_write_name,
};

pub fn run(data: &[u8]) {
    check(&String::from_utf8_lossy(data));
}

pub fn check(name: &str) {
    let read = parse_read_name(name);
    let write = parse_write_name(name);
    match &read {
        Ok(r) => check_read(name, r),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match &write {
        Ok(w) => check_write(name, w),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    assert!(
        read.is_err() || write.is_err(),
        "{name:?} is both a read name {read:?} and a write name {write:?}"
    );
}

fn check_digest(d: &Digest) {
    let hex = d.hex();
    assert_eq!(hex.len(), 64, "{d:?}");
    assert!(
        hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{hex:?} is not lowercase hex"
    );
    assert!(d.size <= i64::MAX as u64, "{d:?} is larger than i64::MAX");
    assert_eq!(d.to_string(), format!("{hex}/{}", d.size));
    let again = parse_read_name(&d.read_name()).expect("a digest's read_name re-parses");
    assert_eq!(
        again,
        ReadName {
            instance: None,
            digest: *d
        }
    );
}

fn check_instance(instance: &Option<String>) {
    if let Some(i) = instance {
        assert!(!i.is_empty() && i.len() <= 128, "instance {i:?}");
        assert!(i != "." && i != "..", "instance {i:?}");
        assert!(
            i.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "instance {i:?}"
        );
    }
}

fn with_instance(instance: &Option<String>, rest: String) -> String {
    match instance {
        Some(i) => format!("{i}/{rest}"),
        None => rest,
    }
}

/// `name` with leading zeros of its last segment (the size) removed.
fn without_size_zeros(name: &str) -> String {
    let (head, size) = name.rsplit_once('/').expect("a parsed name has a '/'");
    let size = size.trim_start_matches('0');
    format!("{head}/{}", if size.is_empty() { "0" } else { size })
}

fn check_read(name: &str, r: &ReadName) {
    assert!(name.len() <= MAX_NAME_LEN);
    check_digest(&r.digest);
    check_instance(&r.instance);
    let canonical = with_instance(&r.instance, r.digest.read_name());
    assert_eq!(parse_read_name(&canonical).as_ref(), Ok(r), "{canonical:?}");
    assert_eq!(
        without_size_zeros(name),
        canonical,
        "{name:?} parsed as {r:?}"
    );
}

fn check_write(name: &str, w: &WriteName) {
    assert!(name.len() <= MAX_NAME_LEN);
    check_digest(&w.digest);
    check_instance(&w.instance);
    assert!(
        !w.uuid.is_empty() && w.uuid.len() <= 128,
        "uuid {:?}",
        w.uuid
    );
    assert!(
        w.uuid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')),
        "uuid {:?}",
        w.uuid
    );
    let canonical = with_instance(
        &w.instance,
        format!("uploads/{}/{}", w.uuid, w.digest.read_name()),
    );
    assert_eq!(
        parse_write_name(&canonical).as_ref(),
        Ok(w),
        "{canonical:?}"
    );
    assert_eq!(
        without_size_zeros(name),
        canonical,
        "{name:?} parsed as {w:?}"
    );
}
