//! Names in the bucket: upload ids and staging generations.

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::api::resource::WriteName;

/// A fixed-length, key-safe id for an upload name (instance names may hold `/`).
pub(super) fn upload_id(name: &WriteName) -> String {
    let mut h = Sha256::new();
    h.update(name.instance.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(name.uuid.as_bytes());
    h.update([0]);
    h.update(name.digest.to_string().as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// A new staging generation: nanoseconds since the epoch, zero-padded, so
/// generations sort by age.
pub(super) fn generation() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos:024}")
}

pub(super) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resource::Digest;

    #[test]
    fn upload_ids_differ_by_instance_uuid_and_digest() {
        let d = Digest {
            hash: [1; 32],
            size: 5,
        };
        let name = |instance: Option<&str>, uuid: &str, d: Digest| WriteName {
            instance: instance.map(str::to_owned),
            uuid: uuid.into(),
            digest: d,
        };
        let a = upload_id(&name(None, "u", d));
        assert_eq!(a.len(), 32);
        assert_ne!(a, upload_id(&name(Some("i"), "u", d)));
        assert_ne!(a, upload_id(&name(None, "v", d)));
        assert_ne!(a, upload_id(&name(None, "u", Digest { size: 6, ..d })));
        assert_eq!(a, upload_id(&name(None, "u", d)));
    }
}
