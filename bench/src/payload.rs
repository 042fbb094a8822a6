//! Payloads with known digests, made in memory. A pool of random 1 MiB blocks
//! (160 MiB, read from `/dev/urandom` once per run, so every run sends content no
//! server has stored yet) and payloads that are distinct rotations of it: sending
//! one costs no generation time during the load, the bench process holds the
//! pool once whatever the count, and the digest is computed before the first
//! byte goes out, as a ByteStream resource name requires.

use std::{io::Read as _, sync::Arc};

use bytes::{Bytes, BytesMut};
use memgate::api::resource::Digest;
use sha2::{Digest as _, Sha256};

/// What ByteStream clients send per message, and memgate's own client.
pub const CHUNK: usize = memgate::client::UPLOAD_CHUNK;
/// Blocks in the pool. With [`STRIDE`] coprime to it, payload `i` starts at
/// block `i * STRIDE % POOL_BLOCKS`: the first 160 payloads all differ.
pub const POOL_BLOCKS: usize = 160;
const STRIDE: usize = 13;

/// The random blocks every payload is cut from.
pub struct Pool {
    blocks: Vec<Bytes>,
}

impl Pool {
    /// [`POOL_BLOCKS`] random blocks of [`CHUNK`] bytes.
    pub fn random() -> std::io::Result<Arc<Pool>> {
        let mut urandom = std::fs::File::open("/dev/urandom")?;
        let mut blocks = Vec::with_capacity(POOL_BLOCKS);
        for _ in 0..POOL_BLOCKS {
            let mut block = vec![0u8; CHUNK];
            urandom.read_exact(&mut block)?;
            blocks.push(Bytes::from(block));
        }
        Ok(Arc::new(Pool { blocks }))
    }
}

/// One payload: rotation `index` of the pool, `digest.size` bytes long.
#[derive(Clone)]
pub struct Payload {
    pool: Arc<Pool>,
    pub index: usize,
    pub digest: Digest,
}

impl Payload {
    /// The payload in [`CHUNK`]s, shared with the pool (no copy).
    pub fn chunks(&self) -> impl Iterator<Item = Bytes> + Send + 'static {
        chunks(self.pool.clone(), self.index, self.digest.size)
    }

    /// The payload in one buffer, for a unary call.
    pub fn contiguous(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.digest.size as usize);
        self.chunks().for_each(|c| buf.extend_from_slice(&c));
        buf.freeze()
    }

    pub fn size(&self) -> u64 {
        self.digest.size
    }
}

/// Payloads `first..first + count`, `size` bytes each, digests computed on two
/// threads (blocking: call from `spawn_blocking` inside a runtime).
pub fn make(pool: &Arc<Pool>, first: usize, count: usize, size: u64) -> Vec<Payload> {
    assert!(
        first + count <= POOL_BLOCKS,
        "at most {POOL_BLOCKS} distinct payloads per run, asked for {}",
        first + count
    );
    let hash = |index: usize| {
        let mut hasher = Sha256::new();
        chunks(pool.clone(), index, size).for_each(|c| hasher.update(&c));
        Payload {
            pool: pool.clone(),
            index,
            digest: Digest {
                hash: hasher.finalize().into(),
                size,
            },
        }
    };
    let (even, odd): (Vec<usize>, Vec<usize>) = (first..first + count).partition(|i| i % 2 == 0);
    let mut payloads = std::thread::scope(|s| {
        let odd = s.spawn(|| odd.into_iter().map(hash).collect::<Vec<_>>());
        let mut all: Vec<Payload> = even.into_iter().map(hash).collect();
        all.extend(odd.join().expect("hashing thread"));
        all
    });
    payloads.sort_by_key(|p| p.index);
    payloads
}

fn chunks(pool: Arc<Pool>, index: usize, size: u64) -> impl Iterator<Item = Bytes> + Send {
    let start = index * STRIDE;
    let size = size as usize;
    (0..size.div_ceil(CHUNK)).map(move |i| {
        let block = &pool.blocks[(start + i) % POOL_BLOCKS];
        block.slice(..CHUNK.min(size - i * CHUNK))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_and_match_their_digests() {
        let pool = Pool::random().unwrap();
        let size = 3 * CHUNK as u64 + 17;
        let payloads = make(&pool, 0, 5, size);
        let hexes: std::collections::HashSet<_> = payloads.iter().map(|p| p.digest.hex()).collect();
        assert_eq!(hexes.len(), 5, "every payload is distinct");
        for p in &payloads {
            let data = p.contiguous();
            assert_eq!(data.len() as u64, size);
            assert_eq!(hex::encode(Sha256::digest(&data)), p.digest.hex());
            assert!(p.chunks().all(|c| c.len() <= CHUNK));
        }
        assert_eq!(make(&pool, 3, 1, 0)[0].chunks().count(), 0);
    }
}
