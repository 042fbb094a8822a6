"""The rendered pieces against the real binary, on loopback: memgate serves
with the chart's config, the `helm test` Pod's command passes against it, the
probes' health services answer as the chart expects, and SIGTERM turns
readiness off at once and ends the process well inside the grace period (which
is why the chart has no preStop hook)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from conftest import RELEASE

# Short shutdown timings keep the test quick; the chart writes them into the
# config exactly as it writes the defaults.
SHUTDOWN = {"shutdown": {"drainDelaySeconds": 1, "graceSeconds": 2}, "terminationGracePeriodSeconds": 10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(memgate_bin, addr: str, service: str) -> int:
    return subprocess.run(
        [str(memgate_bin), "health", "--addr", addr, "--service", service, "--timeout", "2s"],
        capture_output=True,
        timeout=30,
    ).returncode


@pytest.fixture
def server(render, memgate_bin, tmp_path):
    r = render(SHUTDOWN)
    config = tmp_path / "memgate.toml"
    config.write_text(r.config_text())
    grpc, admin = free_port(), free_port()
    args = r.container()["args"]
    # The container's own arguments, with the listeners moved to free loopback
    # ports and the data dir to a temporary one (flags win over the file).
    args = [a if a != args[args.index("--config") + 1] else str(config) for a in args]
    log = tmp_path / "memgate.log"
    proc = subprocess.Popen(
        [str(memgate_bin), *args, "--grpc-addr", f"127.0.0.1:{grpc}", "--admin-addr", f"127.0.0.1:{admin}", "--data-dir", str(tmp_path / "data")],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    proc.log = log
    addr = f"http://127.0.0.1:{grpc}"
    deadline = time.monotonic() + 30
    while health(memgate_bin, addr, "readiness") != 0:
        if proc.poll() is not None:
            pytest.fail(f"memgate exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("memgate did not become ready in 30 s")
        time.sleep(0.2)
    yield r, proc, addr
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_helm_test_command_passes_against_the_server(server, memgate_bin):
    r, _, addr = server
    (c,) = r.one("Pod", component="test")["spec"]["containers"]
    args = list(c["args"])
    service_addr = args[args.index("--addr") + 1]
    assert service_addr.startswith(f"http://{RELEASE}:")
    args[args.index("--addr") + 1] = addr
    assert subprocess.run([str(memgate_bin), *args], capture_output=True, timeout=30).returncode == 0


def test_probe_services_answer(server, memgate_bin):
    r, _, addr = server
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
        service = r.container()[probe]["grpc"]["service"]
        assert health(memgate_bin, addr, service) == 0, probe
    # An unknown service is not SERVING, so a typo in a probe would fail.
    assert health(memgate_bin, addr, "readyness") != 0


def test_sigterm_drains_within_the_grace_period(server, memgate_bin):
    r, proc, addr = server
    pod = r.deployment()["spec"]["template"]["spec"]
    assert "lifecycle" not in r.container()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # Readiness turns NOT_SERVING at once, while the server still answers.
    time.sleep(0.3)
    assert health(memgate_bin, addr, "readiness") != 0
    assert health(memgate_bin, addr, "") == 0, "liveness must hold during the drain"
    code = proc.wait(timeout=pod["terminationGracePeriodSeconds"])
    elapsed = time.monotonic() - start
    assert code == 0, proc.log.read_text()[-2000:]
    # It waited the drain delay and then left: inside the pod's grace period.
    assert 1.0 <= elapsed < pod["terminationGracePeriodSeconds"]
