//! Resource names, as the Remote Execution API spells them:
//! writes `[{instance}/]uploads/{uuid}/blobs/{sha256}/{size}[/{metadata}]`, reads
//! `[{instance}/]blobs/{sha256}/{size}`. The instance is one segment (the API
//! leaves its syntax to the server); trailing `optional_metadata` segments of a
//! write name are ignored, as the API allows. Pure parsing; no I/O.

use std::fmt;

/// A content address: SHA-256 and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    pub hash: [u8; 32],
    pub size: u64,
}

impl Digest {
    /// Lowercase hex of the hash.
    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// The SHA-256 of no bytes.
    pub const EMPTY: Digest = Digest {
        hash: [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ],
        size: 0,
    };

    /// The empty blob, which the Remote Execution API says every server has
    /// ("Servers MUST behave as though empty blobs are always available").
    pub fn is_empty_blob(&self) -> bool {
        *self == Self::EMPTY
    }

    /// The read name of this blob: `blobs/{sha256}/{size}`.
    pub fn read_name(&self) -> String {
        format!("blobs/{}/{}", self.hex(), self.size)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

/// A parsed read name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadName {
    pub instance: Option<String>,
    pub digest: Digest,
}

/// A parsed write name; `uuid` identifies the upload session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteName {
    pub instance: Option<String>,
    pub uuid: String,
    pub digest: Digest,
}

/// Why a resource name was refused; the message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("resource name is empty")]
    Empty,
    #[error("resource name {0:?} is longer than {MAX_NAME_LEN} bytes")]
    TooLong(usize),
    #[error("resource name {name:?} does not match `{expected}`")]
    Shape {
        name: String,
        expected: &'static str,
    },
    #[error("{0:?} is not a SHA-256 hash (64 lowercase hex digits)")]
    Hash(String),
    #[error("{0:?} is not a size in bytes (a non-negative decimal integer)")]
    Size(String),
    #[error("upload id {0:?} must be 1 to 128 characters of [A-Za-z0-9_-]")]
    Uuid(String),
    #[error("instance name {0:?} must be 1 to 128 characters of [A-Za-z0-9_.-]")]
    Instance(String),
    #[error(
        "digest function {0:?} is not supported: memgate stores SHA-256 blobs, whose names \
         carry no digest function segment"
    )]
    DigestFunction(String),
    #[error(
        "compressed-blobs names are not supported (memgate offers no compressors): use \
         `[{{instance}}/]uploads/{{uuid}}/blobs/{{sha256}}/{{size}}` and gRPC compression instead"
    )]
    Compressed,
}

/// The digest functions of the API's `DigestFunction` enum, as names spell them.
const DIGEST_FUNCTIONS: [&str; 9] = [
    "sha256",
    "sha1",
    "md5",
    "vso",
    "sha384",
    "sha512",
    "murmur3",
    "sha256tree",
    "blake3",
];

/// Names longer than this are refused before any parsing.
pub const MAX_NAME_LEN: usize = 1024;

const READ_SHAPE: &str = "[{instance}/]blobs/{sha256}/{size}";
const WRITE_SHAPE: &str = "[{instance}/]uploads/{uuid}/blobs/{sha256}/{size}[/{metadata}]";

/// Parses `[{instance}/]blobs/{sha256}/{size}`.
pub fn parse_read_name(name: &str) -> Result<ReadName, NameError> {
    let parts = split(name)?;
    let (instance, rest) = match parts.as_slice() {
        ["blobs", _, _] => (None, &parts[1..]),
        [inst, "blobs", _, _] => (Some(instance(inst)?), &parts[2..]),
        ["compressed-blobs", ..] | [_, "compressed-blobs", ..] => {
            return Err(NameError::Compressed);
        }
        ["blobs", f, _, _] | [_, "blobs", f, _, _] if DIGEST_FUNCTIONS.contains(f) => {
            return Err(NameError::DigestFunction(f.to_string()));
        }
        _ => return Err(shape(name, READ_SHAPE)),
    };
    Ok(ReadName {
        instance,
        digest: digest(rest[0], rest[1])?,
    })
}

/// Parses `[{instance}/]uploads/{uuid}/blobs/{sha256}/{size}`.
pub fn parse_write_name(name: &str) -> Result<WriteName, NameError> {
    let parts = split(name)?;
    // Anything after the size is the API's `optional_metadata`, which servers may ignore.
    let (instance, rest) = match parts.as_slice() {
        ["uploads", _, "blobs", h, _, ..] | [_, "uploads", _, "blobs", h, _, ..]
            if DIGEST_FUNCTIONS.contains(h) =>
        {
            return Err(NameError::DigestFunction(h.to_string()));
        }
        ["uploads", _, "blobs", _, _, ..] => (None, &parts[1..]),
        [inst, "uploads", _, "blobs", _, _, ..] => (Some(instance(inst)?), &parts[2..]),
        ["uploads", _, "compressed-blobs", ..] | [_, "uploads", _, "compressed-blobs", ..] => {
            return Err(NameError::Compressed);
        }
        _ => return Err(shape(name, WRITE_SHAPE)),
    };
    let uuid = rest[0];
    if uuid.is_empty()
        || uuid.len() > 128
        || !uuid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(NameError::Uuid(uuid.to_string()));
    }
    Ok(WriteName {
        instance,
        uuid: uuid.to_string(),
        digest: digest(rest[2], rest[3])?,
    })
}

fn split(name: &str) -> Result<Vec<&str>, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    Ok(name.split('/').collect())
}

fn shape(name: &str, expected: &'static str) -> NameError {
    NameError::Shape {
        name: name.to_string(),
        expected,
    }
}

fn instance(s: &str) -> Result<String, NameError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(NameError::Instance(s.to_string()))
    }
}

fn digest(hash: &str, size: &str) -> Result<Digest, NameError> {
    if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(NameError::Hash(hash.to_string()));
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hash, &mut bytes).map_err(|_| NameError::Hash(hash.to_string()))?;
    // Only plain decimal digits: no sign, no whitespace, no leading '+'.
    if size.is_empty() || size.len() > 19 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NameError::Size(size.to_string()));
    }
    let size: u64 = size
        .parse()
        .map_err(|_| NameError::Size(size.to_string()))?;
    if size > i64::MAX as u64 {
        return Err(NameError::Size(size.to_string()));
    }
    Ok(Digest { hash: bytes, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn read_names() {
        let ok = parse_read_name(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(ok.digest.hex(), H);
        assert_eq!(ok.digest.size, 0);
        assert_eq!(ok.instance, None);
        let inst = parse_read_name(&format!("main/blobs/{H}/42")).unwrap();
        assert_eq!(inst.instance.as_deref(), Some("main"));
        assert_eq!(inst.digest.size, 42);
        assert_eq!(inst.digest.read_name(), format!("blobs/{H}/42"));

        type Check = fn(&NameError) -> bool;
        let bad: &[(String, Check)] = &[
            (String::new(), |e| matches!(e, NameError::Empty)),
            (format!("blob/{H}/1"), |e| {
                matches!(e, NameError::Shape { .. })
            }),
            (format!("blobs/{H}"), |e| {
                matches!(e, NameError::Shape { .. })
            }),
            (format!("a/b/blobs/{H}/1"), |e| {
                matches!(e, NameError::Shape { .. })
            }),
            (format!("blobs/{}/1", H.to_uppercase()), |e| {
                matches!(e, NameError::Hash(_))
            }),
            (format!("blobs/{}/1", &H[1..]), |e| {
                matches!(e, NameError::Hash(_))
            }),
            (format!("blobs/{H}/-1"), |e| matches!(e, NameError::Size(_))),
            (format!("blobs/{H}/+1"), |e| matches!(e, NameError::Size(_))),
            (format!("blobs/{H}/ 1"), |e| matches!(e, NameError::Size(_))),
            (format!("blobs/{H}/99999999999999999999"), |e| {
                matches!(e, NameError::Size(_))
            }),
            (format!("blobs/{H}/9223372036854775808"), |e| {
                matches!(e, NameError::Size(_))
            }),
            (format!("../blobs/{H}/1"), |e| {
                matches!(e, NameError::Instance(_))
            }),
            ("x".repeat(MAX_NAME_LEN + 1), |e| {
                matches!(e, NameError::TooLong(_))
            }),
        ];
        for (name, want) in bad {
            let err = parse_read_name(name).unwrap_err();
            assert!(want(&err), "{name:?} gave {err:?}");
        }
    }

    #[test]
    fn write_names() {
        let w = parse_write_name(&format!("uploads/0f1e-2d/blobs/{H}/7")).unwrap();
        assert_eq!(w.uuid, "0f1e-2d");
        assert_eq!(w.digest.size, 7);
        let w = parse_write_name(&format!("inst/uploads/u1/blobs/{H}/7")).unwrap();
        assert_eq!(w.instance.as_deref(), Some("inst"));
        for name in [
            format!("uploads//blobs/{H}/7"),
            format!("uploads/../blobs/{H}/7"),
            format!("uploads/a.b/blobs/{H}/7"),
        ] {
            assert!(
                matches!(parse_write_name(&name), Err(NameError::Uuid(_))),
                "{name}"
            );
        }
        assert!(matches!(
            parse_write_name(&format!("blobs/{H}/7")),
            Err(NameError::Shape { .. })
        ));
        assert!(matches!(
            parse_write_name(&format!("uploads/u/blobs/{H}/x")),
            Err(NameError::Size(_))
        ));
    }

    #[test]
    fn write_names_may_carry_metadata_and_name_what_is_unsupported() {
        // REAPI: `.../blobs/{hash}/{size}{/optional_metadata}`; servers may ignore it.
        for name in [
            format!("uploads/u1/blobs/{H}/7/meta"),
            format!("inst/uploads/u1/blobs/{H}/7/a/b/c"),
        ] {
            let w = parse_write_name(&name).unwrap();
            assert_eq!((w.uuid.as_str(), w.digest.size), ("u1", 7), "{name}");
        }
        assert!(matches!(
            parse_write_name(&format!("uploads/u/blobs/blake3/{H}/7")),
            Err(NameError::DigestFunction(f)) if f == "blake3"
        ));
        assert!(matches!(
            parse_read_name(&format!("main/blobs/sha256tree/{H}/7")),
            Err(NameError::DigestFunction(f)) if f == "sha256tree"
        ));
        assert!(matches!(
            parse_write_name(&format!("uploads/u/compressed-blobs/zstd/{H}/7")),
            Err(NameError::Compressed)
        ));
        assert!(matches!(
            parse_read_name(&format!("compressed-blobs/zstd/{H}/7")),
            Err(NameError::Compressed)
        ));
        // Reads have no metadata.
        assert!(matches!(
            parse_read_name(&format!("blobs/{H}/7/meta")),
            Err(NameError::Shape { .. })
        ));
        assert!(Digest::EMPTY.is_empty_blob());
        assert_eq!(Digest::EMPTY.hex(), H);
    }
}
