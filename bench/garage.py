"""A throwaway single-node Garage (S3-compatible object store) on loopback, for
benchmarks: config and data under a directory the caller owns, one bucket, one
key. The binary is the one `scripts/install-garage.sh` installs (it prints its
path) or `MEMGATE_GARAGE_BIN`.

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


class Garage:
    def __init__(self, workdir: Path) -> None:
        self.bin = garage_bin()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        rpc, self.s3_port = _free_port(), _free_port()
        self.config = self.dir / "garage.toml"
        self.config.write_text(
            f'metadata_dir = "{self.dir / "meta"}"\ndata_dir = "{self.dir / "data"}"\n'
            f'db_engine = "sqlite"\nreplication_factor = 1\n'
            f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
            f'rpc_secret = "{secrets.token_hex(32)}"\n'
            f'[s3_api]\ns3_region = "{REGION}"\napi_bind_addr = "127.0.0.1:{self.s3_port}"\n'
            f'root_domain = ".s3.garage.localhost"\n'
        )
        self._log = open(self.dir / "garage.log", "w")
        self.proc = subprocess.Popen(
            [self.bin, "-c", str(self.config), "server"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "warn"},
        )
        deadline = time.monotonic() + 30
        while self._cli("status", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"garage did not start: {(self.dir / 'garage.log').read_text()}")
            time.sleep(0.1)
        node = self._cli("node", "id", "-q").stdout.strip().split("@")[0]
        self._cli("layout", "assign", "-z", "dc1", "-c", "10G", node)
        self._cli("layout", "apply", "--version", "1")
        self._cli("bucket", "create", BUCKET)
        key = self._cli("key", "create", "bench").stdout
        self.key_id = re.search(r"Key ID:\s*(\S+)", key).group(1)
        self.secret = re.search(r"Secret key:\s*(\S+)", key).group(1)
        self._cli("bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "bench")
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.s3_port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("garage's S3 port did not open")
                time.sleep(0.05)

    def _cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.bin, "-c", str(self.config), *args], capture_output=True, text=True, check=check
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

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

    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
