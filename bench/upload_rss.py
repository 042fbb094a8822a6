#!/usr/bin/env python3
"""Server memory and throughput of ByteStream uploads, against the release binary.

For each data-directory configuration (a directory on the disk that holds
`target/`, and one on /dev/shm, a tmpfs) and each scenario (one 150 MB upload;
8 concurrent 150 MB uploads), repeated --repeats times with a freshly started
server each time:

  * idle RSS of `memgate serve` (VmRSS, once it answers on its port),
  * peak RSS growth over idle while the uploads run: VmRSS sampled every 10 ms
    from a thread, and VmHWM read at the end (the server is new, so its
    high-water mark covers this scenario only),
  * wall time of the `memgate upload FILE` client processes and MB/s
    (MB = 10^6 bytes; the client hashes the file before sending it, so this is
    the end-to-end figure a user sees), and the server's own Write duration
    from its JSON access log,
  * `openssl dgst -sha256` of the same files in the same run (concurrently for
    the concurrent scenario) and the ratio upload rate / openssl rate,
  * the data directory's raw write floor: `dd if=FILE of=DIR/x bs=1M conv=fdatasync`.

Each upload gets a new random file, so nothing is deduplicated. Medians over the
repeats go in a Markdown table on stdout, everything (every run) in
target/bench/upload_rss.json.

A third configuration, `s3`, stores the blobs in a local Garage (an
S3-compatible server, data on the disk under target/; installed by
scripts/install-garage.sh) through memgate's s3 backend. A fourth, `s3-cluster`,
stores them in a three-node Garage cluster with replication factor 3 on the
same machine (every byte written three times, each write acknowledged by two
nodes); memgate talks to the first node. Neither S3 configuration has a
throughput target: Garage shares the machine's cores and disk with memgate and
the clients, so the rate measures the machine as much as memgate.

Targets: one upload grows RSS <= 32 MiB; 8 concurrent <= 128 MiB; upload
throughput >= 0.4 x openssl. With S3: growth <= 8 MiB part x 4 parts in flight
x uploads + 64 MiB (96 MiB for one, 320 MiB for 8).

    bench/upload_rss.py                       # builds --release first
    bench/upload_rss.py --repeats 1 --no-build --configs tmpfs

Python 3.11, standard library only; Linux (/proc) only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from garage import Garage, GarageCluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO / "target" / "release" / "memgate"
REPORT = REPO / "target" / "bench" / "upload_rss.json"
MIB = 1024 * 1024
MB = 1000 * 1000

TARGET_ONE_MIB = 32
TARGET_CONCURRENT_MIB = 128
TARGET_RATIO = 0.4
# S3: each Write holds part_size x parts_in_flight in multipart parts (the
# defaults, 8 MiB x 4), plus 64 MiB for everything else.
S3_PART_MIB, S3_PARTS_IN_FLIGHT, S3_SLACK_MIB = 8, 4, 64


def ratio_target(config: str) -> float | None:
    """The throughput target for a configuration: none for S3 (see the docstring)."""
    return None if config.startswith("s3") else TARGET_RATIO


def s3_target_mib(uploads: int) -> int:
    return S3_PART_MIB * S3_PARTS_IN_FLIGHT * uploads + S3_SLACK_MIB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build() -> None:
    log("== cargo build --release")
    subprocess.run(["cargo", "build", "--release", "--bin", "memgate"], cwd=REPO, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, key: str) -> int:
    """A `VmXXX:  1234 kB` line of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class RssSampler(threading.Thread):
    """Samples VmRSS every `interval` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.010) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, KeyError):
                return
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak_kib


class Server:
    """`memgate serve` on 127.0.0.1:<free port> with its own data directory."""

    def __init__(self, data_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGATE__") and k != "RUST_LOG"}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [
                str(BINARY), "serve",
                "--grpc-addr", f"127.0.0.1:{self.port}",
                "--admin-addr", "127.0.0.1:0",
                "--data-dir", str(data_dir),
                "--log-format", "json",
            ],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        self._wait_ready()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memgate serve exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("memgate serve did not open its port within 30 s")

    def idle_rss_kib(self) -> int:
        # Let start-up allocations settle, then take the lowest of a few readings.
        time.sleep(0.3)
        readings = []
        for _ in range(5):
            readings.append(proc_status_kib(self.proc.pid, "VmRSS"))
            time.sleep(0.02)
        return min(readings)

    def write_durations_ms(self) -> list[float]:
        """Server-side durations of successful Write calls, from the JSON access log."""
        self._log.flush()
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("method", "").endswith("/Write") and rec.get("status") == "Ok":
                out.append(float(rec["duration_ms"]))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def run_all(cmds: list[list[str]]) -> tuple[float, list[str]]:
    """Runs the commands at once; returns the wall time until the last exits, and their stdouts."""
    start = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = []
    for p, c in zip(procs, cmds):
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(c)} failed ({p.returncode}): {err.strip()}")
        outs.append(out)
    return time.monotonic() - start, outs


def openssl_hashes(files: list[Path]) -> tuple[float, dict[str, str]]:
    """`openssl dgst -sha256` of every file at once: wall time and hash per file."""
    secs, outs = run_all([["openssl", "dgst", "-sha256", str(f)] for f in files])
    hashes = {}
    for f, out in zip(files, outs):
        m = re.search(r"=\s*([0-9a-f]{64})\s*$", out.strip())
        if not m:
            raise RuntimeError(f"unexpected openssl output: {out!r}")
        hashes[str(f)] = m.group(1)
    return secs, hashes


def dd_rate(src: Path, data_dir: Path) -> float:
    """MB/s of `dd ... conv=fdatasync` from `src` into the data directory."""
    dst = data_dir / "dd-floor.tmp"
    start = time.monotonic()
    subprocess.run(
        ["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fdatasync"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    secs = time.monotonic() - start
    size = dst.stat().st_size
    dst.unlink()
    return size / MB / secs


@dataclass
class Run:
    idle_mib: float
    peak_growth_mib: float
    hwm_growth_mib: float
    wall_s: float
    mb_per_s: float
    server_mb_per_s: float
    openssl_mb_per_s: float
    ratio: float
    dd_mb_per_s: float
    rss_samples: int


@dataclass
class Scenario:
    config: str
    name: str
    uploads: int
    target_mib: int
    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.runs)


def measure(
    config: str, base: Path, src_dir: Path, uploads: int, size: int, work: Path, garage: Garage | None = None
) -> Run:
    files = []
    for i in range(uploads):
        f = src_dir / f"upload-{i}.bin"
        make_file(f, size)
        files.append(f)
    data_dir = Path(tempfile.mkdtemp(prefix="memgate-bench-", dir=base))
    try:
        # The raw write floor of this data directory, from the same file sizes.
        dd = dd_rate(files[0], data_dir)
        # openssl over the same files, concurrently when the uploads are.
        ssl_secs, hashes = openssl_hashes(files)

        # With S3, each run writes under its own key prefix of the shared bucket.
        extra_env = garage.memgate_env(prefix=f"{data_dir.name}/") if garage else None
        server = Server(data_dir, work / f"server-{config}-{uploads}.log", extra_env)
        try:
            idle = server.idle_rss_kib()
            sampler = RssSampler(server.proc.pid)
            sampler.start()
            cmds = [[str(BINARY), "upload", str(f), "--addr", server.addr] for f in files]
            wall, outs = run_all(cmds)
            peak = sampler.stop()
            hwm = proc_status_kib(server.proc.pid, "VmHWM")
            durations = server.write_durations_ms()
        finally:
            server.stop()

        for f, out in zip(files, outs):
            want = f"blobs/{hashes[str(f)]}/{size}"
            if out.strip() != want:
                raise RuntimeError(f"upload of {f} printed {out.strip()!r}, expected {want!r}")
            if garage is None:  # with S3 the server verified the digest before committing
                blob = data_dir / "blobs" / hashes[str(f)][:2] / hashes[str(f)]
                if blob.stat().st_size != size:
                    raise RuntimeError(f"stored blob {blob} has the wrong size")
        total_mb = uploads * size / MB
        mb_s = total_mb / wall
        ssl_mb_s = total_mb / ssl_secs
        # Server side: from the first Write's start to the last one's end is not in
        # the log, so use the longest Write (they overlap when concurrent).
        server_mb_s = total_mb / (max(durations) / 1000) if len(durations) == uploads else float("nan")
        return Run(
            idle_mib=idle / 1024,
            peak_growth_mib=max(0, peak - idle) / 1024,
            hwm_growth_mib=max(0, hwm - idle) / 1024,
            wall_s=wall,
            mb_per_s=mb_s,
            server_mb_per_s=server_mb_s,
            openssl_mb_per_s=ssl_mb_s,
            ratio=mb_s / ssl_mb_s,
            dd_mb_per_s=dd,
            rss_samples=sampler.samples,
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        for f in files:
            f.unlink(missing_ok=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(scenarios: list[Scenario]) -> str:
    head = (
        "| data dir | scenario | idle RSS MiB | peak RSS growth MiB (10 ms samples) | VmHWM growth MiB "
        "| RSS target | wall s | upload MB/s | server Write MB/s | openssl MB/s | ratio | ratio target "
        "| dd fdatasync MB/s |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in scenarios:
        growth = max(s.median("peak_growth_mib"), s.median("hwm_growth_mib"))
        ratio = s.median("ratio")
        target = ratio_target(s.config)
        ratio_verdict = "n/a" if target is None else f"{verdict(ratio >= target)} (>= {target})"
        rows.append(
            f"| {s.config} | {s.name} | {s.median('idle_mib'):.1f} | {s.median('peak_growth_mib'):.1f} "
            f"| {s.median('hwm_growth_mib'):.1f} | {verdict(growth <= s.target_mib)} (<= {s.target_mib}) "
            f"| {s.median('wall_s'):.2f} | {s.median('mb_per_s'):.0f} | {s.median('server_mb_per_s'):.0f} "
            f"| {s.median('openssl_mb_per_s'):.0f} | {ratio:.2f} | {ratio_verdict} "
            f"| {s.median('dd_mb_per_s'):.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="measurements per scenario (median reported)")
    ap.add_argument("--size-mb", type=int, default=150, help="upload size in MB (10^6 bytes)")
    ap.add_argument("--concurrency", type=int, default=8, help="uploads in the concurrent scenario")
    ap.add_argument(
        "--configs",
        default="disk,tmpfs,s3",
        help="comma-separated: disk (under target/), tmpfs (/dev/shm), s3 (a local Garage, data under "
        "target/), s3-cluster (three Garage nodes, replication factor 3)",
    )
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release first")
    args = ap.parse_args()

    if not args.no_build:
        build()
    if not BINARY.exists():
        log(f"{BINARY} missing: run without --no-build")
        return 2
    for tool in ("openssl", "dd"):
        if shutil.which(tool) is None:
            log(f"{tool} not found")
            return 2

    size = args.size_mb * MB
    bases = {"disk": REPO / "target" / "bench" / "data", "tmpfs": Path("/dev/shm")}
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    scenarios: list[Scenario] = []
    with tempfile.TemporaryDirectory(prefix="memgate-bench-work-", dir=REPO / "target" / "bench") as work_s:
        work = Path(work_s)
        # Source files on tmpfs: reading them costs the clients no disk time.
        with tempfile.TemporaryDirectory(prefix="memgate-bench-src-", dir="/dev/shm") as src_s:
            src = Path(src_s)
            for config in configs:
                base = bases.get(config, bases["disk"])
                base.mkdir(parents=True, exist_ok=True)
                s3 = config in ("s3", "s3-cluster")
                targets = (
                    (s3_target_mib(1), s3_target_mib(args.concurrency))
                    if s3
                    else (TARGET_ONE_MIB, TARGET_CONCURRENT_MIB)
                )
                for name, uploads, target in (
                    ("1 x upload", 1, targets[0]),
                    (f"{args.concurrency} x concurrent", args.concurrency, targets[1]),
                ):
                    s = Scenario(config, name, uploads, target)
                    for i in range(args.repeats):
                        # A fresh Garage for every run, removed after it: a cluster
                        # keeps three copies of every upload, and Garage frees the
                        # blocks of deleted objects only later.
                        garage_dir = work / f"garage-{config}-{uploads}-{i}"
                        garage = (
                            None
                            if not s3
                            else Garage(garage_dir)
                            if config == "s3"
                            else GarageCluster(garage_dir)
                        )
                        try:
                            run = measure(config, base, src, uploads, size, work, garage)
                        finally:
                            if garage:
                                garage.stop()
                                shutil.rmtree(garage_dir, ignore_errors=True)
                        log(
                            f"{config:5} {name:16} run {i + 1}/{args.repeats}: +{run.peak_growth_mib:.1f} MiB "
                            f"(HWM +{run.hwm_growth_mib:.1f}), {run.wall_s:.2f} s, {run.mb_per_s:.0f} MB/s, "
                            f"openssl {run.openssl_mb_per_s:.0f} MB/s, dd {run.dd_mb_per_s:.0f} MB/s"
                        )
                        s.runs.append(run)
                    scenarios.append(s)

    md = table(scenarios)
    print(f"\nmemgate upload RSS and throughput: {args.size_mb} MB uploads, median of {args.repeats}, "
          f"{os.cpu_count()} CPUs\n")
    print(md)
    report = {
        "size_bytes": size,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "binary": str(BINARY),
        "targets": {
            "one_upload_growth_mib": TARGET_ONE_MIB,
            "concurrent_growth_mib": TARGET_CONCURRENT_MIB,
            "throughput_ratio_to_openssl": TARGET_RATIO,
        },
        "scenarios": [
            {
                "config": s.config,
                "scenario": s.name,
                "uploads": s.uploads,
                "median": {k: s.median(k) for k in Run.__dataclass_fields__},
                "pass_rss": max(s.median("peak_growth_mib"), s.median("hwm_growth_mib")) <= s.target_mib,
                "pass_ratio": ratio_target(s.config) is None or s.median("ratio") >= TARGET_RATIO,
                "runs": [r.__dict__ for r in s.runs],
            }
            for s in scenarios
        ],
        "markdown": md,
    }
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON report: {REPORT.relative_to(REPO)}")
    ok = all(d["pass_rss"] and d["pass_ratio"] for d in report["scenarios"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
