"""TLS and token auth in the chart: auth is on unless turned off (with a
generated token when no Secret is given), TLS is opt-in; every file the
rendered config names comes from a Secret mounted as a whole directory (never
subPath, so in-place renewal reaches the pod); with TLS on the probes and
`helm test` use the admin port."""

from __future__ import annotations

import base64
import hashlib
import posixpath
import tomllib

import helm_python
import pytest

from conftest import REQUIRED, value_sets

TLS = {"tls": {"enabled": True, "existingSecret": "memgate-tls"}}
MTLS = {"tls": {"enabled": True, "existingSecret": "memgate-tls", "clientCA": {"existingSecret": "memgate-client-ca"}}}


def render_error(chart, values) -> str:
    with pytest.raises(helm_python.HelmError) as err:
        chart.render(values, name="memgate", namespace="x")
    return str(err.value)


def secret_files(r) -> dict[str, tuple[str, str]]:
    """Every file the pod gets from a Secret: its path in the container ->
    (Secret name, key). Fails on a subPath mount or a non-read-only one."""
    pod = r.deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in r.container()["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if not secret:
            continue
        # A subPath mount is a snapshot: the kubelet never updates it, so a
        # renewed certificate or a new token would not reach the pod.
        assert "subPath" not in mount and "subPathExpr" not in mount, f"{r.name}: {mount['name']} uses subPath"
        assert mount["readOnly"] is True, f"{r.name}: {mount['name']}"
        # Readable by the pod's group only (fsGroup owns the files), and only
        # the keys memgate reads: a CA's Secret may hold its private key too.
        assert secret["defaultMode"] == 0o440
        assert secret["items"], f"{r.name}: {mount['name']} mounts every key of {secret['secretName']}"
        for item in secret["items"]:
            files[posixpath.join(mount["mountPath"], item["path"])] = (secret["secretName"], item["key"])
    return files


@pytest.mark.parametrize("name", list(value_sets()))
def test_every_file_the_config_names_is_a_mounted_secret_key(renders, name):
    r = renders[name]
    files = secret_files(r)
    cfg = r.config()
    named = [cfg.get("tls", {}).get(k) for k in ["cert_file", "key_file", "client_ca_file"]]
    named.append(cfg["auth"].get("tokens_file"))
    named = [f for f in named if f]
    assert sorted(named) == sorted(files), f"{name}: the config and the Secret mounts disagree"


def generated(r) -> tuple[str, dict]:
    """The generated client token and the parsed tokens file it must match."""
    client = r.one("Secret", component="client-token")
    tokens = r.one("Secret", component="tokens-file")
    token = base64.b64decode(client["data"]["token"]).decode()
    (key,) = tokens["data"]
    return token, tomllib.loads(base64.b64decode(tokens["data"][key]).decode())


def test_defaults_alone_render_with_a_generated_token(render):
    # `helm install` / `helm template` with no values at all: auth stays on,
    # with a token the chart draws and a tokens file holding only its hash.
    r = render({}, base={})
    client = r.one("Secret", component="client-token")
    assert client["metadata"]["name"] == "memgate-client-token"
    assert r.one("Secret", component="tokens-file")["metadata"]["name"] == "memgate-tokens"
    token, table = generated(r)
    assert len(token) == 48 and token.isalnum()
    (entry,) = table["tokens"]
    assert entry["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert sorted(entry["permissions"]) == ["process", "read", "write"]
    # The token itself never reaches the pod: only the tokens file is mounted.
    assert secret_files(r) == {"/etc/memgate/auth/tokens.toml": ("memgate-tokens", "tokens.toml")}
    notes = r.files["memgate/templates/NOTES.txt"]
    assert "get secret memgate-client-token -o jsonpath='{.data.token}' | base64 -d" in notes
    # Without a cluster to look the Secret up in, every render draws afresh,
    # and each render agrees with itself.
    again, table = generated(render({}, base={}))
    assert again != token
    assert table["tokens"][0]["sha256"] == hashlib.sha256(again.encode()).hexdigest()


def test_an_existing_secret_replaces_the_generated_token(render):
    r = render({"auth": {"existingSecret": "my-tokens", "tokensKey": "t.toml"}}, base={})
    assert [o for o in r.objects if o["kind"] == "Secret"] == []
    assert secret_files(r) == {"/etc/memgate/auth/tokens.toml": ("my-tokens", "t.toml")}
    assert "client-token" not in r.files["memgate/templates/NOTES.txt"]
    # The generated tokens file follows tokensKey too.
    r = render({"auth": {"tokensKey": "t.toml"}}, base={})
    assert secret_files(r) == {"/etc/memgate/auth/tokens.toml": ("memgate-tokens", "t.toml")}
    assert list(r.one("Secret", component="tokens-file")["data"]) == ["t.toml"]


def test_auth_is_on_by_default(renders):
    r = renders["default"]
    assert r.values == REQUIRED == {}
    assert r.config()["auth"] == {"enabled": True, "tokens_file": "/etc/memgate/auth/tokens.toml"}
    assert secret_files(r) == {"/etc/memgate/auth/tokens.toml": ("memgate-tokens", "tokens.toml")}
    (mount,) = [m for m in r.container()["volumeMounts"] if m["name"] == "auth"]
    assert mount["mountPath"] == "/etc/memgate/auth"
    notes = r.files["memgate/templates/NOTES.txt"]
    assert "needs a token" in notes and "Secret memgate-tokens" in notes


def test_auth_off_is_explicit_and_mounts_nothing(render):
    r = render({"auth": {"enabled": False}}, base={})
    # Written out, so the ConfigMap itself says calls need no credentials.
    assert r.config()["auth"] == {"enabled": False}
    assert "[auth]\n  enabled = false\n" in r.config_text()
    assert secret_files(r) == {}
    assert "OFF: every caller" in r.files["memgate/templates/NOTES.txt"]


def test_mutual_tls_with_a_generated_token(render):
    r = render(MTLS, base={})
    assert secret_files(r) == {
        "/etc/memgate/tls/tls.crt": ("memgate-tls", "tls.crt"),
        "/etc/memgate/tls/tls.key": ("memgate-tls", "tls.key"),
        "/etc/memgate/client-ca/ca.crt": ("memgate-client-ca", "ca.crt"),
        "/etc/memgate/auth/tokens.toml": ("memgate-tokens", "tokens.toml"),
    }
    token, table = generated(r)
    assert table["tokens"][0]["sha256"] == hashlib.sha256(token.encode()).hexdigest()


def test_tls_is_off_by_default(renders):
    r = renders["default"]
    assert "tls" not in r.config()
    assert all(p["grpc"]["port"] == 50051 for p in [r.container()[f"{k}Probe"] for k in ["startup", "liveness", "readiness"]])


def test_tls_mounts_the_certificate_and_moves_the_probes(render):
    r = render(TLS)
    assert r.config()["tls"] == {"cert_file": "/etc/memgate/tls/tls.crt", "key_file": "/etc/memgate/tls/tls.key"}
    assert secret_files(r) == {
        "/etc/memgate/tls/tls.crt": ("memgate-tls", "tls.crt"),
        "/etc/memgate/tls/tls.key": ("memgate-tls", "tls.key"),
        "/etc/memgate/auth/tokens.toml": ("memgate-tokens", "tokens.toml"),
    }
    c = r.container()
    for kind, service in [("startup", ""), ("liveness", ""), ("readiness", "readiness")]:
        assert c[f"{kind}Probe"]["grpc"] == {"port": 9090, "service": service}, kind
    (test,) = r.one("Pod", component="test")["spec"]["containers"]
    assert test["args"][test["args"].index("--addr") + 1] == "http://memgate:9090"
    # The probes stay on the gRPC port's number only when TLS is off.
    assert render({"ports": {"admin": 8080}, **TLS}).container()["readinessProbe"]["grpc"]["port"] == 8080


def test_mutual_tls_and_auth_render_three_directory_mounts(renders):
    r = renders["tls-auth-values"]
    tls = r.values["tls"]
    assert r.config()["tls"] == {
        "cert_file": "/etc/memgate/tls/tls.crt",
        "key_file": "/etc/memgate/tls/tls.key",
        "client_ca_file": "/etc/memgate/client-ca/ca.crt",
        "reload_interval": "30s",
    }
    assert r.config()["auth"] == {"enabled": True, "tokens_file": "/etc/memgate/auth/tokens.toml", "reload_interval": "5s"}
    mounts = {m["name"]: m for m in r.container()["volumeMounts"]}
    assert {n: mounts[n]["mountPath"] for n in ["tls", "client-ca", "auth"]} == {
        "tls": "/etc/memgate/tls",
        "client-ca": "/etc/memgate/client-ca",
        "auth": "/etc/memgate/auth",
    }
    # Keys other than the defaults reach the fixed file names the config gives.
    assert secret_files(r) == {
        "/etc/memgate/tls/tls.crt": (tls["existingSecret"], "tls.crt"),
        "/etc/memgate/tls/tls.key": (tls["existingSecret"], "tls.key"),
        "/etc/memgate/client-ca/ca.crt": (tls["clientCA"]["existingSecret"], "bundle.pem"),
        "/etc/memgate/auth/tokens.toml": ("memgate-tokens", "memgate-tokens.toml"),
    }
    assert all(m["grpc"]["port"] == 9090 for m in [r.container()[f"{k}Probe"] for k in ["startup", "liveness", "readiness"]])


@pytest.mark.parametrize(
    "values, wanted",
    [
        ({**REQUIRED, "tls": {"enabled": True}}, "tls.enabled: set tls.existingSecret to a kubernetes.io/tls Secret"),
        ({**REQUIRED, "tls": {"clientCA": {"existingSecret": "ca"}}}, "tls.clientCA.existingSecret is set but tls.enabled is false"),
    ],
)
def test_incomplete_tls_and_auth_values_are_refused(chart, values, wanted):
    assert wanted in render_error(chart, values)
