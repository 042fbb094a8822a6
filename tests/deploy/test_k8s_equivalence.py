"""k8s/ is the chart's defaults as plain manifests. These tests render the
chart with its default values and compare what matters: the pod (image,
arguments, ports, probes, resources, security, volumes, grace period), the
Service, the ServiceAccount and the config file."""

from __future__ import annotations

import copy
import tomllib

import yaml

from conftest import K8S

HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"}


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                objects[obj["kind"]] = obj
    return objects


def labels(obj: dict) -> dict:
    return {k: v for k, v in obj["metadata"].get("labels", {}).items() if k not in HELM_ONLY_LABELS}


def pod_template(deployment: dict) -> dict:
    template = copy.deepcopy(deployment["spec"]["template"])
    # The checksum annotation is the chart's way to roll pods on a config
    # change; kustomize's configMapGenerator does it by renaming the ConfigMap.
    template["metadata"].pop("annotations", None)
    return template


def test_pod_templates_are_equal(renders):
    chart = renders["default"].deployment()
    plain = k8s_objects()["Deployment"]
    assert pod_template(plain) == pod_template(chart)
    # Spelled out, for a readable failure on the parts that matter most.
    c, p = chart["spec"]["template"]["spec"]["containers"][0], plain["spec"]["template"]["spec"]["containers"][0]
    for key in ["image", "args", "ports", "startupProbe", "livenessProbe", "readinessProbe", "resources"]:
        assert p[key] == c[key], key


def test_deployment_specs_are_equal(renders):
    chart = renders["default"].deployment()
    plain = k8s_objects()["Deployment"]
    for key in ["replicas", "strategy", "selector", "revisionHistoryLimit"]:
        assert plain["spec"][key] == chart["spec"][key], key
    assert labels(plain) == labels(chart)
    assert plain["metadata"]["name"] == chart["metadata"]["name"]
    assert "namespace" not in plain["metadata"], "k8s/ is namespace-agnostic"


def test_services_and_service_accounts_are_equal(renders):
    plain = k8s_objects()
    for kind in ["Service", "ServiceAccount"]:
        chart = renders["default"].one(kind)
        assert labels(plain[kind]) == labels(chart), kind
        assert plain[kind]["metadata"]["name"] == chart["metadata"]["name"], kind
        assert "namespace" not in plain[kind]["metadata"], kind
    assert plain["Service"]["spec"] == renders["default"].one("Service")["spec"]
    sa = renders["default"].one("ServiceAccount")
    assert plain["ServiceAccount"]["automountServiceAccountToken"] == sa["automountServiceAccountToken"]


def test_config_files_are_equal(renders):
    chart = renders["default"].config()
    plain = tomllib.loads((K8S / "memgate.toml").read_text())
    assert plain == chart


def test_kustomization_generates_the_configmap_the_pod_mounts(renders):
    kustomization = k8s_objects()["Kustomization"]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["memgate.toml"]
    volumes = {v["name"]: v for v in k8s_objects()["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == generator["name"]
    assert volumes["config"]["configMap"]["items"] == [{"key": "memgate.toml", "path": "memgate.toml"}]
    assert "namespace" not in kustomization
    assert sorted(kustomization["resources"]) == ["deployment.yaml", "service.yaml", "serviceaccount.yaml"]
