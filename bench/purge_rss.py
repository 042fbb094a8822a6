#!/usr/bin/env python3
"""Purge effect: the server's RSS after a 150 MB Process call with echo.

    python3 bench/purge_rss.py [--reps 5] [--size-mb 150]

Builds the release binary, then for each configuration starts `memgate serve`
on loopback, measures its idle RSS, and runs `--reps` calls of
`memgate process FILE --echo`; after each call it samples the server's VmRSS
at 0, 0.25, 0.5, 1 and 2 s. It reports medians of RSS minus idle at each point.

Configurations (the same binary, in the same run):
  guard on          the defaults: purge after every request >= purge_threshold
  guard on, no purge  purge_threshold raised past any request: jemalloc's
                      embedded decay (dirty_decay_ms:1000) alone
  guard off         memory.enabled = false: no admission, no purge
Target (issue "The memory guard"): guard on, RSS at 1 s within 16 MiB of idle.
Standard library only; writes target/bench/purge_rss.json.
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "memgate")
POINTS = [0.0, 0.25, 0.5, 1.0, 2.0]
MIB = 1024 * 1024

CONFIGS = [
    ("guard on", {}),
    ("guard on, no purge", {"MEMGATE__MEMORY__PURGE_THRESHOLD": "1TiB"}),
    ("guard off", {"MEMGATE__MEMORY__ENABLED": "false"}),
]


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def run_config(name, env_extra, payload, reps):
    port = free_port()
    data = tempfile.mkdtemp(prefix="memgate-bench-")
    env = dict(os.environ, **env_extra)
    env.pop("_RJEM_MALLOC_CONF", None)
    proc = subprocess.Popen(
        [BIN, "serve", "--grpc-addr", f"127.0.0.1:{port}", "--admin-addr", "127.0.0.1:0", "--data-dir", data],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        time.sleep(1.0)  # let start-up allocations settle
        idle = rss(proc.pid)
        series = {p: [] for p in POINTS}
        for _ in range(reps):
            subprocess.run([BIN, "process", payload, "--echo", "--addr", f"http://127.0.0.1:{port}"],
                           check=True, stdout=subprocess.DEVNULL)
            t0 = time.monotonic()
            for p in POINTS:
                while time.monotonic() - t0 < p:
                    time.sleep(0.005)
                series[p].append(rss(proc.pid) - idle)
            time.sleep(0.5)
        return {"config": name, "idle_rss": idle,
                "growth_median": {str(p): statistics.median(v) for p, v in series.items()}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=150)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=ROOT, check=True)
    payload = os.path.join(tempfile.mkdtemp(prefix="memgate-payload-"), "payload")
    with open(payload, "wb") as f:
        f.write(os.urandom(args.size_mb * 1000 * 1000))
    results = [run_config(n, e, payload, args.reps) for n, e in CONFIGS]
    os.remove(payload)
    print(f"Server RSS above idle after a {args.size_mb} MB Process call with echo "
          f"(median of {args.reps}, {os.cpu_count()} cores):\n")
    print("| configuration | idle RSS | " + " | ".join(f"+{p:g} s" for p in POINTS) + " |")
    print("|---|---|" + "---|" * len(POINTS))
    for r in results:
        cells = " | ".join(f"{r['growth_median'][str(p)] / MIB:.1f} MiB" for p in POINTS)
        print(f"| {r['config']} | {r['idle_rss'] / MIB:.1f} MiB | {cells} |")
    on = results[0]["growth_median"]["1.0"] / MIB
    print(f"\nguard on, +1 s: {on:.1f} MiB above idle -> {'PASS' if on <= 16 else 'FAIL'} (target <= 16 MiB)")
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target", "bench", "purge_rss.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
