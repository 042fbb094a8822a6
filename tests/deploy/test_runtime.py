"""The rendered pieces against the real binary, on loopback: memgate serves
with the chart's config and the files its Secret volumes would mount, the
`helm test` Pod's command passes against it, the probes' health services answer
on the port the probes dial (the admin port once the gRPC port speaks TLS), and
SIGTERM turns readiness off at once and ends the process well inside the grace
period (which is why the chart has no preStop hook)."""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import re
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest
import yaml

from conftest import CHART, RELEASE, ROOT, Render, deploy_section, merged

# Short shutdown timings keep the test quick; the chart writes them into the
# config exactly as it writes the defaults.
SHUTDOWN = {"shutdown": {"drainDelaySeconds": 1, "graceSeconds": 2}, "terminationGracePeriodSeconds": 10}
TLS_AUTH = yaml.safe_load((CHART / "ci" / "tls-auth-values.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


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


def openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: pathlib.Path) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as
    cert-manager would leave them in Secrets (PEM, PKCS#8 keys)."""
    folder.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=memgate-test-ca", cwd=folder)
    for name, ext in [("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "subjectAltName=DNS:client.test")]:
        (folder / f"{name}.ext").write_text(ext + "\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}.test", cwd=folder)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder,
        )  # fmt: skip
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def documented_tokens_file() -> str:
    """The tokens file docs/deploy.md shows, with the hash of a fresh token where it
    says to put one: memgate must load the documented format as it stands."""
    (example,) = re.findall(r"```toml\n(.*?)```", deploy_section(), re.S)
    token = secrets.token_hex(32)  # what `openssl rand -hex 32` prints
    placeholder = "<the 64 hex digits printed above>"
    assert placeholder in example
    return example.replace(placeholder, hashlib.sha256(token.encode()).hexdigest())


def mount_secrets(r, secret_data: dict[str, dict[str, bytes]], root: pathlib.Path) -> str:
    """Lays out under `root` what the kubelet would mount from the Deployment's
    Secret volumes (each item's key to its path in the mount), and returns the
    rendered config with those mount paths moved under `root` too."""
    pod = r.deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = r.config_text()
    for mount in r.container()["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if not secret:
            continue
        folder = root / mount["mountPath"].lstrip("/")
        folder.mkdir(parents=True)
        for item in secret["items"]:
            (folder / item["path"]).write_bytes(secret_data[secret["secretName"]][item["key"]])
        config = config.replace(f'"{mount["mountPath"]}/', f'"{folder}/')
    return config


@dataclass
class Server:
    r: Render
    proc: subprocess.Popen
    grpc: int  # the loopback ports standing in for the container's
    admin: int
    pki: pathlib.Path

    def local(self, container_port: int) -> int:
        """The loopback port standing in for a container port of the render."""
        named = {p["containerPort"]: p["name"] for p in self.r.container()["ports"]}
        return {"grpc": self.grpc, "admin": self.admin}[named[container_port]]


@pytest.fixture
def start(render, memgate_bin, tmp_path):
    """start(values) -> Server: memgate run with the container's own arguments
    and the rendered config, its listeners moved to free loopback ports and the
    data dir to a temporary one (flags win over the file), and the Secrets the
    values name mounted as the pod would."""
    procs = []

    def _start(values: dict) -> Server:
        r = render(merged(SHUTDOWN, values))
        v = merged(VALUES, r.values)  # with the chart's defaults, as Helm sees them
        # The Secrets the chart renders (the generated token and tokens file),
        # and the ones the values name, with the tokens file docs/deploy.md shows.
        secret_data = {
            o["metadata"]["name"]: {k: base64.b64decode(b) for k, b in o.get("data", {}).items()}
            for o in r.objects
            if o["kind"] == "Secret"
        }
        if v["auth"]["enabled"] and v["auth"]["existingSecret"]:
            secret_data[v["auth"]["existingSecret"]] = {v["auth"]["tokensKey"]: documented_tokens_file().encode()}
        pki = tmp_path / "pki"
        if v["tls"]["enabled"]:
            files = make_pki(pki)
            # As cert-manager writes it; the chart mounts tls.crt and tls.key only.
            secret_data[v["tls"]["existingSecret"]] = {
                "tls.crt": files["server.crt"],
                "tls.key": files["server.key"],
                "ca.crt": files["ca.crt"],
            }
            if v["tls"]["clientCA"]["existingSecret"]:
                secret_data[v["tls"]["clientCA"]["existingSecret"]] = {v["tls"]["clientCA"]["bundleKey"]: files["ca.crt"]}
        config = tmp_path / "memgate.toml"
        config.write_text(mount_secrets(r, secret_data, tmp_path / "pod"))
        grpc, admin = free_port(), free_port()
        args = r.container()["args"]
        args = [a if a != args[args.index("--config") + 1] else str(config) for a in args]
        log = tmp_path / "memgate.log"
        proc = subprocess.Popen(
            [str(memgate_bin), *args, "--grpc-addr", f"127.0.0.1:{grpc}", "--admin-addr", f"127.0.0.1:{admin}", "--data-dir", str(tmp_path / "data")],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        proc.log = log
        procs.append(proc)
        deadline = time.monotonic() + 30
        # The admin port's health service answers in plaintext whatever [tls] says.
        while health(memgate_bin, f"http://127.0.0.1:{admin}", "readiness") != 0:
            if proc.poll() is not None:
                pytest.fail(f"memgate exited: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"memgate did not become ready in 30 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        return Server(r, proc, grpc, admin, pki)

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("values", [{}, TLS_AUTH], ids=["default", "tls-auth"])
def test_helm_test_command_passes_against_the_server(start, memgate_bin, values):
    server = start(values)
    (c,) = server.r.one("Pod", component="test")["spec"]["containers"]
    args = list(c["args"])
    service_addr = args[args.index("--addr") + 1]
    host, port = service_addr.removeprefix("http://").split(":")
    assert host == RELEASE
    args[args.index("--addr") + 1] = f"http://127.0.0.1:{server.local(int(port))}"
    assert subprocess.run([str(memgate_bin), *args], capture_output=True, timeout=30).returncode == 0


@pytest.mark.parametrize("values", [{}, TLS_AUTH], ids=["default", "tls-auth"])
def test_probe_services_answer_on_the_probed_port(start, memgate_bin, values):
    # The kubelet's gRPC probe speaks plaintext h2c to the port it names, with
    # no credentials: the health service must answer there with auth on.
    server = start(values)
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
        action = server.r.container()[probe]["grpc"]
        addr = f"http://127.0.0.1:{server.local(action['port'])}"
        assert health(memgate_bin, addr, action["service"]) == 0, probe
    # An unknown service is not SERVING, so a typo in a probe would fail.
    assert health(memgate_bin, addr, "readyness") != 0


def test_tls_port_refuses_plaintext_and_serves_the_mounted_certificate(start, memgate_bin):
    server = start(TLS_AUTH)
    grpc = server.grpc
    # Why the probes moved: plaintext gRPC, as the kubelet's probe speaks it,
    # gets nothing from the TLS port.
    assert health(memgate_bin, f"http://127.0.0.1:{grpc}", "") != 0
    # The certificate from the tls Secret, verified against the CA, with a
    # client certificate from that CA (mTLS).
    handshake = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{grpc}", "-alpn", "h2", "-brief",
            "-CAfile", "ca.crt", "-verify_return_error", "-verify_ip", "127.0.0.1",
            "-cert", "client.crt", "-key", "client.key",
        ],
        cwd=server.pki,
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert handshake.returncode == 0, handshake.stderr
    assert "Verification: OK" in handshake.stderr
    assert "CN=server.test" in handshake.stderr or "CN = server.test" in handshake.stderr


def test_sigterm_drains_within_the_grace_period(start, memgate_bin):
    server = start({})
    r, proc = server.r, server.proc
    addr = f"http://127.0.0.1:{server.grpc}"
    pod = r.deployment()["spec"]["template"]["spec"]
    assert "lifecycle" not in r.container()
    start_time = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # Readiness turns NOT_SERVING at once, while the server still answers.
    time.sleep(0.3)
    assert health(memgate_bin, addr, "readiness") != 0
    assert health(memgate_bin, addr, "") == 0, "liveness must hold during the drain"
    code = proc.wait(timeout=pod["terminationGracePeriodSeconds"])
    elapsed = time.monotonic() - start_time
    assert code == 0, proc.log.read_text()[-2000:]
    # It waited the drain delay and then left: inside the pod's grace period.
    assert 1.0 <= elapsed < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("auth", [True, False], ids=["auth-on", "auth-off"])
def test_rendered_auth_decides_whether_a_call_needs_a_token(start, memgate_bin, tmp_path, auth):
    # The chart's [auth] is live in the real server: with it on (the default)
    # an upload without a token is refused; with auth.enabled false it is served.
    server = start({} if auth else {"auth": {"enabled": False}})
    blob = tmp_path / "blob"
    blob.write_bytes(b"memgate deploy check\n")
    result = subprocess.run(
        [str(memgate_bin), "upload", str(blob), "--addr", f"http://127.0.0.1:{server.grpc}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if auth:
        assert result.returncode != 0
        # tonic's wording of UNAUTHENTICATED.
        assert "does not have valid authentication credentials" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().startswith("blobs/")


def interop_python() -> str:
    """grpcio's python (target/interop-venv), installed if missing."""
    out = subprocess.run(
        ["bash", "scripts/interop-venv.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def test_the_generated_token_authenticates_a_real_client(start):
    # The defaults alone: the token the chart drew for clients (its client
    # Secret) is accepted by the server that mounts the chart's tokens file,
    # and nothing else is.
    server = start({})
    secret = server.r.one("Secret", component="client-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    result = subprocess.run(
        [interop_python(), str(ROOT / "tests" / "deploy" / "token_client.py"), "--target", f"127.0.0.1:{server.grpc}", "--token", token],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "with_token": len(b"memgate chart-generated token\n"),
        "read_back_equal": True,
        "without": "UNAUTHENTICATED",
        "wrong": "UNAUTHENTICATED",
    }, seen
