//! Real S3 servers for the tests: Garage on loopback with throwaway configs
//! and data dirs, one bucket and one key made through its CLI.
//!
//! - [`Garage`]: a single node, started by each test that needs one (half a
//!   second), so tests stay independent and one can stop its store mid-upload;
//! - [`Cluster`]: three nodes with replication factor 3, the store as it runs
//!   in production, where one node can die without losing a write;
//! - [`Storage`]: a test's blobs on local disk or in a Garage, so one suite
//!   runs against both backends.
//!
//! The binary comes from `MEMGATE_GARAGE_BIN`, else from the cache that
//! `scripts/install-garage.sh` fills (the test command runs it first). Without
//! it the S3 tests fail and say so: they are never skipped.
// Each test binary uses a different part of this module.
#![allow(dead_code, unused_imports)]

mod cluster;
mod garage;
mod node;
pub mod replica;

use std::path::Path;

use memgate::config::{Backend, Config};

pub use cluster::{Cluster, NODES};
pub use garage::{Access, BUCKET, Garage};

/// Where a test's blobs live: local disk or a Garage bucket, chosen per test so
/// one suite runs against both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Local,
    S3,
}

/// A test's storage: its Garage (for S3) and where it keeps its objects.
pub struct Storage {
    pub kind: Kind,
    pub garage: Option<Garage>,
    prefix: String,
}

impl Storage {
    pub fn new(kind: Kind) -> Self {
        let garage = (kind == Kind::S3).then(Garage::start);
        Self {
            kind,
            garage,
            prefix: "memgate-test/".into(),
        }
    }

    /// Points `cfg` at this storage (the local data dir is the server's own).
    pub fn configure(&self, cfg: &mut Config) {
        if let Some(g) = &self.garage {
            cfg.storage.backend = Backend::S3;
            cfg.storage.s3 = g.s3_config(&self.prefix);
        }
    }

    /// Everything stored: files under `data_dir` for local disk; for S3, keys
    /// under the prefix and multipart uploads still open there. Proof that
    /// nothing was stored, or what was.
    pub async fn stored(&self, data_dir: &Path) -> Vec<String> {
        match &self.garage {
            Some(g) => {
                let objects = g.list(&self.prefix).await.into_iter().map(|(k, _)| k);
                let open = g.open_uploads(&self.prefix).await.into_iter();
                objects
                    .chain(open.map(|(k, _)| format!("{k} (open)")))
                    .collect()
            }
            None => walk(data_dir),
        }
    }

    pub fn garage(&mut self) -> &mut Garage {
        self.garage.as_mut().expect("an S3 storage")
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out.sort();
    out
}

impl Storage {
    /// Partial uploads: `.part` files for local disk; for S3, keys under
    /// `uploads/` and multipart uploads still open there (they hold bytes too).
    pub async fn partials(&self, data_dir: &Path) -> Vec<String> {
        match &self.garage {
            Some(g) => {
                let uploads = format!("{}uploads", self.prefix);
                let objects = g.list(&uploads).await.into_iter().map(|(k, _)| k);
                let open = g.open_uploads(&uploads).await.into_iter();
                objects
                    .chain(open.map(|(k, _)| format!("{k} (open)")))
                    .collect()
            }
            None => walk(&data_dir.join("uploads"))
                .into_iter()
                .filter(|p| p.ends_with(".part"))
                .collect(),
        }
    }

    /// Where a blob with this SHA-256 is stored, as [`Storage::stored`] lists it.
    pub fn blob_entry(&self, data_dir: &Path, hex: &str) -> String {
        match self.kind {
            Kind::Local => data_dir
                .join("blobs")
                .join(&hex[..2])
                .join(hex)
                .display()
                .to_string(),
            Kind::S3 => format!("{}blobs/{hex}", self.prefix),
        }
    }
}
