"""A throwaway Garage (S3-compatible object store) on loopback, for benchmarks:
config and data under a directory the caller owns, one bucket, one key. `Garage`
is a single node (replication factor 1); `GarageCluster` is three nodes with
replication factor 3, each in its own zone, so every write is stored three
times and acknowledged by two. The binary is the one `scripts/install-garage.sh`
installs (it prints its path) or `MEMGATE_GARAGE_BIN`.

Python 3.11, standard library only.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUCKET = "memgate"
REGION = "garage"


def garage_bin() -> str:
    if os.environ.get("MEMGATE_GARAGE_BIN"):
        return os.environ["MEMGATE_GARAGE_BIN"]
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-garage.sh")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Node:
    """One `garage server` process with its own config, ports, data and log."""

    def __init__(self, bin: str, workdir: Path, secret: str, replication: int) -> None:
        self.bin = bin
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        rpc, self.s3_port = _free_port(), _free_port()
        self.config = self.dir / "garage.toml"
        self.config.write_text(
            f'metadata_dir = "{self.dir / "meta"}"\ndata_dir = "{self.dir / "data"}"\n'
            f'db_engine = "sqlite"\nreplication_factor = {replication}\n'
            f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
            f'rpc_secret = "{secret}"\n'
            f'[s3_api]\ns3_region = "{REGION}"\napi_bind_addr = "127.0.0.1:{self.s3_port}"\n'
            f'root_domain = ".s3.garage.localhost"\n'
        )
        self._log = open(self.dir / "garage.log", "w")
        self.proc = subprocess.Popen(
            [self.bin, "-c", str(self.config), "server"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "warn"},
        )

    def wait_rpc(self, deadline: float) -> None:
        while self.cli("status", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"garage did not start: {(self.dir / 'garage.log').read_text()}")
            time.sleep(0.1)

    def wait_s3(self, deadline: float) -> None:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.s3_port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("garage's S3 port did not open")
                time.sleep(0.05)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.bin, "-c", str(self.config), *args], capture_output=True, text=True, check=check
        )

    def address(self) -> str:
        return self.cli("node", "id", "-q").stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Garage:
    """`nodes` Garage nodes with replication factor `nodes`, one bucket, one key."""

    def __init__(self, workdir: Path, nodes: int = 1) -> None:
        bin = garage_bin()
        secret = secrets.token_hex(32)
        deadline = time.monotonic() + 60
        self.nodes = [
            _Node(bin, workdir if nodes == 1 else workdir / f"node{i + 1}", secret, nodes)
            for i in range(nodes)
        ]
        try:
            for n in self.nodes:
                n.wait_rpc(deadline)
            first = self.nodes[0]
            for other in self.nodes[1:]:
                first.cli("node", "connect", other.address())
            for i, n in enumerate(self.nodes):
                first.cli("layout", "assign", "-z", f"dc{i + 1}", "-c", "10G", n.address().split("@")[0])
            first.cli("layout", "apply", "--version", "1")
            first.cli("bucket", "create", BUCKET)
            key = first.cli("key", "create", "bench").stdout
            self.key_id = re.search(r"Key ID:\s*(\S+)", key).group(1)
            self.secret = re.search(r"Secret key:\s*(\S+)", key).group(1)
            first.cli("bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "bench")
            for n in self.nodes:
                n.wait_s3(deadline)
        except BaseException:
            self.stop()
            raise

    @property
    def endpoint(self) -> str:
        """The S3 API of the first node (every node serves the whole cluster)."""
        return f"http://127.0.0.1:{self.nodes[0].s3_port}"

    def memgate_env(self, prefix: str = "bench/") -> dict[str, str]:
        """Environment that points `memgate serve` at this Garage."""
        return {
            "MEMGATE__STORAGE__BACKEND": "s3",
            "MEMGATE__STORAGE__S3__ENDPOINT": self.endpoint,
            "MEMGATE__STORAGE__S3__REGION": REGION,
            "MEMGATE__STORAGE__S3__BUCKET": BUCKET,
            "MEMGATE__STORAGE__S3__PREFIX": prefix,
            "MEMGATE__STORAGE__S3__PATH_STYLE": "true",
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
        }

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def GarageCluster(workdir: Path) -> Garage:
    """Three nodes, replication factor 3, each in its own zone."""
    return Garage(workdir, nodes=3)
