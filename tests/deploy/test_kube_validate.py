"""Every rendered object and every file in k8s/ against the Kubernetes OpenAPI
schemas bundled with kubernetes-validate, in strict mode (unknown fields are
errors), for the oldest supported Kubernetes (1.27) and the newest it knows."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv

from conftest import K8S, value_sets

OLDEST = "1.27.0"
NEWEST = kv.latest_version()
VERSIONS = sorted({OLDEST, NEWEST})

# Custom resources have no bundled schema; each gets one below, written from
# the CRD's documentation for the fields the chart uses (strict like the rest).
PROM_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": LABELS, "matchExpressions": {"type": "array"}},
}
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": LABELS},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": PROM_DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": PROM_DURATION},
                        },
                    },
                },
            },
        },
    },
}
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR}


def validate(obj: dict, version: str) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM:
        jsonschema.validate(obj, CUSTOM[key])
    else:
        kubernetes_validate.validate(obj, version, strict=True)


def test_validator_is_strict():
    # Proves the checks below can fail: an unknown field and a wrong type.
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "appProtocl": "grpc"}]},
    }
    with pytest.raises(kv.ValidationError):
        validate(bad, OLDEST)
    bad["spec"]["ports"][0] = {"port": "fifty"}
    with pytest.raises(kv.ValidationError):
        validate(bad, NEWEST)
    with pytest.raises(kv.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Nope", "metadata": {"name": "x"}}, NEWEST)
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "admin", "intervall": "30s"}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, NEWEST)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", list(value_sets()))
def test_rendered_objects_validate(renders, name, version):
    r = renders[name]
    assert r.objects
    for path, obj in r.located:
        try:
            validate(obj, version)
        except (kv.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{name}: {path}: {obj['kind']} {'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("version", VERSIONS)
def test_k8s_manifests_validate(version):
    files = sorted(K8S.glob("*.yaml"))
    kinds = []
    for path in files:
        for obj in yaml.safe_load_all(path.read_text()):
            if not obj:
                continue
            kinds.append(obj["kind"])
            if obj["kind"] == "Kustomization":
                # kustomize's own file, not an object sent to the API server.
                assert set(obj["resources"]) <= {p.name for p in files}
                continue
            try:
                validate(obj, version)
            except jsonschema.ValidationError as e:
                pytest.fail(f"{path.name}: {obj['kind']} {'.'.join(map(str, e.path))}: {e.message}")
    assert sorted(kinds) == ["Deployment", "Kustomization", "Service", "ServiceAccount"]


def test_newest_version_is_newer_than_the_floor():
    assert tuple(map(int, NEWEST.split(".")[:2])) > (1, 27)
