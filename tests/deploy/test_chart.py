"""The chart as Helm sees it: strict lint, renders of every value set, the
kubeVersion floor, and a schema that turns typos into install-time errors."""

from __future__ import annotations

import json
import re
import shutil

import helm_python
import pytest
import yaml

from conftest import CHART, REQUIRED, ci_value_files, value_sets

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def lint_errors(values: dict | None = None, **opts) -> list[str]:
    report = helm_python.lint(CHART, values, strict=True, **opts)
    # Severity 1 is informational ("icon is recommended"); strict lint counts
    # warnings (2) and errors (3).
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + list(
        report["errors"]
    )


@pytest.mark.parametrize("name", list(value_sets()))
def test_lint_strict(name):
    assert lint_errors(value_sets()[name]) == []


def test_every_ci_set_renders_what_it_enables(renders):
    # The ci sets exist to exercise the optional parts; between them they must
    # render every template that is off by default.
    kinds = set()
    for r in renders.values():
        kinds |= set(r.kinds())
    for kind in [
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "NetworkPolicy",
    ]:
        assert kind in kinds, f"no ci/*.yaml set renders a {kind}"
    assert "ServiceMonitor" not in renders["default"].kinds()
    overridden = [
        r.name
        for r in renders.values()
        if "httpGet" in r.container()["livenessProbe"] and "httpGet" in r.container()["readinessProbe"]
    ]
    assert overridden, "no ci/*.yaml set overrides the probes"
    # TLS with client certificates, and auth turned off, are optional parts too.
    mtls = [r.name for r in renders.values() if r.config().get("tls", {}).get("client_ca_file")]
    assert mtls, "no ci/*.yaml set turns on TLS with a client CA"
    assert not renders["default"].config().get("tls"), "TLS is opt-in"
    off = [r.name for r in renders.values() if r.config()["auth"]["enabled"] is False]
    assert off, "no ci/*.yaml set turns auth off"
    assert len(ci_value_files()) >= 6


def test_default_render_has_the_base_objects(renders):
    # The two Secrets hold the generated token and its tokens file.
    assert renders["default"].kinds() == ["ConfigMap", "Deployment", "Pod", "Secret", "Secret", "Service", "ServiceAccount"]


def test_notes_say_how_to_reach_and_check_it(renders):
    notes = renders["default"].files["memgate/templates/NOTES.txt"]
    assert "port-forward svc/memgate 50051:50051" in notes
    assert "--service readiness" in notes
    assert "helm test memgate" in notes


# A kubeconfig that points nowhere, so that no test can reach a real cluster
# from a developer's ~/.kube/config.
NOWHERE = """\
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: none, user: {}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def dry_run_install(chart_dir, values=None):
    """`helm install --dry-run=client`: the whole install path, no cluster."""
    with helm_python.Config(namespace="memgate-system", kubeconfig_content=NOWHERE) as cfg:
        return cfg.install(str(chart_dir), "memgate", values or {}, dry_run="client")


def test_install_dry_run_checks_the_kube_version_floor(tmp_path):
    # Native gRPC probes are GA in 1.27; Helm refuses older clusters at install.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.27.0-0"
    release = dry_run_install(CHART, REQUIRED)
    assert "kind: Deployment" in release["manifest"]
    # The same chart demanding a Kubernetes newer than Helm's offline default
    # is refused, which shows the field is enforced at install time.
    copy = tmp_path / "memgate"
    shutil.copytree(CHART, copy)
    text = (copy / "Chart.yaml").read_text().replace(">=1.27.0-0", ">=1.999.0-0")
    (copy / "Chart.yaml").write_text(text)
    with pytest.raises(helm_python.HelmReleaseError, match="requires kubeVersion"):
        dry_run_install(copy, REQUIRED)


@pytest.mark.parametrize(
    "values, where",
    [
        ({"replicaCont": 1}, "replicaCont"),
        ({"image": {"tga": "1.0"}}, "tga"),
        ({"config": {"memroy": {"budget_ratio": 0.5}}}, "memroy"),
        ({"config": {"memory": {"budget_ratoi": 0.5}}}, "budget_ratoi"),
        ({"config": {"memory": {"budget_ratio": 1.5}}}, "budget_ratio"),
        ({"config": {"server": {"max_message_size": 268435456}}}, "max_message_size"),
        ({"config": {"server": {"grpc_addr": "0.0.0.0:1"}}}, "grpc_addr"),
        ({"config": {"admin": {"addr": "0.0.0.0:1"}}}, "admin"),
        ({"config": {"storage": {"s3": {"secret_access_key": "x"}}}}, "secret_access_key"),
        ({"storage": {"backend": "s4"}}, "backend"),
        ({"storage": {"s3": {"bukcet": "b"}}}, "bukcet"),
        ({"resources": {"limits": {"memory": None}}}, "memory"),
        ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
        ({"probes": {"readiness": {"periodSecond": 5}}}, "periodSecond"),
        ({"probes": {"liveness": {"override": {"httpGet": {"path": "/livez", "prot": 9090}}}}}, "prot"),
        ({"persistence": {"enabeld": True}}, "enabeld"),
        ({"networkPolicy": {"grpcFrom": [{"podSelectr": {}}]}}, "podSelectr"),
        ({"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}}, "requiredDuringScheduling"),
        ({"shutdown": {"graceSeconds": -1}}, "graceSeconds"),
        ({"ports": {"grpc": 70000}}, "grpc"),
        ({"tls": {"enabeld": True}}, "enabeld"),
        ({"tls": {"clientCA": {"existingSecret": "Not_A_Name"}}}, "existingSecret"),
        ({"tls": {"clientCA": {"bundleKey": ""}}}, "bundleKey"),
        ({"auth": {"enabled": "yes"}}, "enabled"),
        ({"auth": {"tokens_file": "/x"}}, "tokens_file"),
        ({"config": {"tls": {"cert_file": "/x.crt"}}}, "cert_file"),
        ({"config": {"auth": {"enabled": False}}}, "enabled"),
        ({"config": {"auth": {"reload_interval": 10}}}, "reload_interval"),
        ({"networkPolicy": {"grpcNamespaces": ["Builds"]}}, "grpcNamespaces"),
        ({"networkPolicy": {"monitoringNamespace": "Monitoring"}}, "monitoringNamespace"),
    ],
)
def test_schema_rejects_typos_and_bad_values(chart, values, where):
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values, name="memgate", namespace="x")
    assert where in str(err.value)
    # `helm lint -f` and `helm install -f` report it the same way.
    assert any(where in e for e in lint_errors(values))


def test_schema_accepts_the_defaults_and_every_ci_set(chart):
    for values in value_sets().values():
        chart.validate_schema(values)


def walk_schema(node, path="#"):
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            yield from walk_schema(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from walk_schema(child, f"{path}/{i}")


def test_schema_closes_every_object():
    # additionalProperties: false wherever properties are listed; the only open
    # objects are maps of strings (labels, annotations, nodeSelector).
    objects = [(p, n) for p, n in walk_schema(SCHEMA) if n.get("type") == "object"]
    assert len(objects) > 40
    for path, node in objects:
        extra = node.get("additionalProperties")
        if "properties" in node:
            assert extra is False, f"{path} lists properties but does not close them"
        else:
            assert extra == {"type": "string"}, f"{path} is an open object"


def test_schema_describes_every_property():
    for path, node in walk_schema(SCHEMA):
        for key, prop in (node.get("properties") or {}).items():
            described = "description" in prop or "$ref" in prop
            assert described, f"{path}/properties/{key} has no description"


def test_values_yaml_keys_are_in_the_schema_and_commented():
    # Every key of values.yaml is a property of the schema (or the schema
    # rejects the chart's own defaults), and the file documents each key.
    def check(values, schema, path):
        if "$ref" in schema:
            schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[1]]
        for ref in schema.get("allOf", []):
            check(values, SCHEMA["definitions"][ref["$ref"].rsplit("/", 1)[1]], path)
        if not isinstance(values, dict) or "properties" not in schema:
            return
        for key, value in values.items():
            assert key in schema["properties"], f"values.yaml {path}{key} is not in the schema"
            check(value, schema["properties"][key], f"{path}{key}.")

    check(VALUES, SCHEMA, "")
    # Every key has a comment right above it; a key repeated in sibling blocks
    # (the three probes) needs it only the first time.
    documented = set()
    for i, line in enumerate((CHART / "values.yaml").read_text().splitlines()):
        key = re.match(r"^\s*([A-Za-z][A-Za-z0-9]*):", line)
        if not key:
            continue
        previous = (CHART / "values.yaml").read_text().splitlines()[i - 1].strip()
        if previous.startswith("#"):
            documented.add(key.group(1))
        assert key.group(1) in documented, f"values.yaml line {i + 1}: no comment above {key.group(1)!r}"
