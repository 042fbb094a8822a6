//! A three-node Garage cluster with replication factor 3 on loopback: each
//! node its own config, ports and data, one RPC secret; node 1 connects to the
//! others, each gets a role in its own zone, and the layout is applied. Writes
//! then need two of the three nodes (Garage's quorum for three copies), so one
//! node can die without the cluster losing a write or a read.
//!
//! Every node serves the S3 API for the whole cluster: memgate replicas pointed
//! at different nodes share one bucket.

use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, path::Path as Key};
use tempfile::TempDir;

use super::{
    garage::{Access, BUCKET},
    node::{Node, rpc_secret},
};

pub const NODES: usize = 3;

/// How long the cluster may take to serve S3 on every node once its layout is
/// applied, or again after a node restarts (Garage reconnects every few seconds).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Cluster {
    nodes: Vec<Node>,
    access: Access,
    // Dropped last: the nodes' files live here.
    _dir: TempDir,
}

impl Cluster {
    /// Starts three nodes, joins them, applies a layout with replication
    /// factor 3, creates the bucket and key, and waits until every node serves
    /// S3 requests. Blocking (a few CLI calls and polls).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("cluster dir");
        let secret = rpc_secret();
        let mut nodes: Vec<Node> = (1..=NODES)
            .map(|i| Node::configure(&dir.path().join(format!("node{i}")), &secret, NODES))
            .collect();
        for n in &mut nodes {
            n.spawn();
        }
        for n in &mut nodes {
            n.wait_for_rpc();
        }
        for other in &nodes[1..] {
            nodes[0].cli(&["node", "connect", &other.address()]);
        }
        for (i, n) in nodes.iter().enumerate() {
            let zone = format!("dc{}", i + 1);
            nodes[0].cli(&["layout", "assign", "-z", &zone, "-c", "10G", &n.id()]);
        }
        nodes[0].cli(&["layout", "apply", "--version", "1"]);
        let (key_id, secret) = nodes[0].create_bucket_and_key(BUCKET, "memgate-test");
        for n in &mut nodes {
            n.wait_for_s3();
        }
        let cluster = Self {
            access: Access::new(key_id, secret, dir.path()),
            nodes,
            _dir: dir,
        };
        for i in 0..NODES {
            cluster.wait_serving(i);
        }
        cluster
    }

    /// The S3 endpoint of node `i` (0-based).
    pub fn endpoint(&self, i: usize) -> String {
        self.nodes[i].endpoint()
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Kills node `i` (SIGKILL).
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its ports and data, and waits until it serves
    /// S3 requests with a quorum behind it. Left alone, Garage 2.5 takes 15 to
    /// 30 s to bring a restarted node back into the mesh (its peering retries);
    /// the harness connects it at once from the live nodes, as an operator
    /// would with `garage node connect`, to keep the suite short.
    pub fn restart(&mut self, i: usize) {
        let t = Instant::now();
        self.nodes[i].restart();
        let address = self.nodes[i].address();
        for (j, other) in self.nodes.iter().enumerate() {
            if j != i && other.is_running() {
                other.cli(&["node", "connect", &address]);
            }
        }
        self.wait_serving(i);
        eprintln!("  node {} back in {:?}", i + 1, t.elapsed());
    }

    /// Restarts every node that is down: a test leaves the cluster whole.
    pub fn heal(&mut self) {
        for i in 0..NODES {
            if !self.nodes[i].is_running() {
                self.restart(i);
            }
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Every object under `prefix`, through the first running node.
    pub async fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        self.access.list(&self.any_endpoint(), prefix).await
    }

    /// Open multipart uploads under `prefix`, through the first running node.
    pub async fn open_uploads(&self, prefix: &str) -> Vec<(String, u64)> {
        self.access.open_uploads(&self.any_endpoint(), prefix).await
    }

    fn any_endpoint(&self) -> String {
        let i = (0..NODES)
            .find(|&i| self.nodes[i].is_running())
            .expect("a running node");
        self.endpoint(i)
    }

    /// Polls (bounded) until node `i` writes and reads an object: it has the
    /// layout, the bucket and a quorum of peers.
    fn wait_serving(&self, i: usize) {
        let endpoint = self.endpoint(i);
        let client = self.access.client(&endpoint);
        let key = Key::from(format!("health/node{i}"));
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let ok = block_on(async {
                client.put(&key, "ok".into()).await.is_ok() && client.head(&key).await.is_ok()
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not serve S3 within {SETTLE_TIMEOUT:?}; log:\n{}",
                self.nodes[i].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `fut` to completion on a runtime of its own, on a thread of its own, so
/// blocking set-up works inside async tests too.
fn block_on<F: Future + Send>(fut: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(fut)
        })
        .join()
        .expect("set-up thread panicked")
    })
}
