"""The chart's generated token across an upgrade. Helm's `lookup` reads the
cluster, which `helm template` has none of; helm-python-sdk's Config.render
renders "cluster-aware", with `lookup` going to a real API server through
client-go. Here that server is a minimal stand-in on loopback, answering the
two requests `lookup "v1" "Secret"` makes (the v1 resource list, then a GET of
one Secret) from an in-memory store, and logging what it was asked.

What this shows: a first install draws a token; an upgrade while its client
Secret exists renders the same token and the same tokens file; deleting that
Secret and upgrading rotates it. What it cannot show: Helm applying the objects
to a real cluster (the test puts the rendered Secret into the store itself, as
an install would leave it).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import tomllib

import helm_python
import pytest
import yaml

from conftest import NAMESPACE, RELEASE

RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret", "verbs": ["get", "list"]},
    ],
}


class FakeApiServer:
    """Secrets by (namespace, name), served as the Kubernetes API serves them."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict] = {}
        self.requests: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                fake.requests.append(path)
                parts = path.strip("/").split("/")
                if path == "/api/v1":
                    return self.reply(200, RESOURCES)
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
                    secret = fake.secrets.get((parts[3], parts[5]))
                    if secret is not None:
                        return self.reply(200, secret)
                    return self.reply(
                        404,
                        {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "reason": "NotFound",
                            "code": 404,
                            "message": f'secrets "{parts[5]}" not found',
                            "details": {"name": parts[5], "kind": "secrets"},
                        },
                    )
                return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def kubeconfig(self) -> str:
        port = self.httpd.server_address[1]
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "fake", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
                "current-context": "fake",
            }
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cluster():
    fake = FakeApiServer()
    yield fake
    fake.close()


def secrets_of(files: dict[str, str]) -> dict[str, dict]:
    out = {}
    for path, text in files.items():
        if path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc and doc["kind"] == "Secret":
                    out[doc["metadata"]["name"]] = doc
    return out


def token_and_hash(secrets: dict[str, dict]) -> tuple[str, str]:
    token = base64.b64decode(secrets["memgate-client-token"]["data"]["token"]).decode()
    table = tomllib.loads(base64.b64decode(secrets["memgate-tokens"]["data"]["tokens.toml"]).decode())
    return token, table["tokens"][0]["sha256"]


def test_an_upgrade_keeps_the_generated_token_and_a_deleted_one_is_rotated(chart, cluster):
    client_path = f"/api/v1/namespaces/{NAMESPACE}/secrets/memgate-client-token"
    with helm_python.Config(namespace=NAMESPACE, kubeconfig_content=cluster.kubeconfig) as cfg:

        def render(**kind) -> dict[str, dict]:
            return secrets_of(cfg.render(chart, {}, name=RELEASE, namespace=NAMESPACE, **kind))

        # First install: nothing to find, a token is drawn.
        first = render(is_install=True)
        token, digest = token_and_hash(first)
        assert digest == hashlib.sha256(token.encode()).hexdigest()
        assert client_path in cluster.requests, cluster.requests

        # The install left its Secret in the cluster; upgrades find it.
        cluster.secrets[(NAMESPACE, "memgate-client-token")] = first["memgate-client-token"]
        for _ in range(2):
            again = render(is_upgrade=True)
            assert again == first, "an upgrade changed the generated Secrets"

        # Someone deleted the client Secret to rotate the token.
        del cluster.secrets[(NAMESPACE, "memgate-client-token")]
        rotated, rotated_digest = token_and_hash(render(is_upgrade=True))
        assert rotated != token
        assert rotated_digest == hashlib.sha256(rotated.encode()).hexdigest() != digest


def test_an_existing_secret_needs_no_lookup(chart, cluster):
    with helm_python.Config(namespace=NAMESPACE, kubeconfig_content=cluster.kubeconfig) as cfg:
        files = cfg.render(chart, {"auth": {"existingSecret": "my-tokens"}}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    assert secrets_of(files) == {}
    assert cluster.requests == []
