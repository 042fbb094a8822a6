"""The NetworkPolicy: the gRPC port from the namespaces and peers listed for
it, the admin port from the monitoring namespace and the peers listed for it,
the `helm test` Pod on the port it checks, and nothing else. (The kubelet's
probes come from the node and are not subject to NetworkPolicy.)"""

from __future__ import annotations

import yaml

from conftest import CHART

ON = {"networkPolicy": {"enabled": True}}


def namespace(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def rules(r) -> tuple[dict, dict]:
    policy = r.one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    grpc_rule, admin_rule = policy["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert admin_rule["ports"] == [{"port": "admin", "protocol": "TCP"}]
    return grpc_rule, admin_rule


def helm_test_peer(r) -> dict:
    labels = r.one("Pod", component="test")["metadata"]["labels"]
    return {"podSelector": {"matchLabels": {k: labels[k] for k in ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"]}}}


def test_defaults_admit_any_grpc_client_and_only_monitoring_on_admin(render):
    r = render(ON)
    grpc_rule, admin_rule = rules(r)
    # No namespace or peer listed for gRPC: the rule has no `from`, so every
    # source may call (the test Pod included).
    assert "from" not in grpc_rule
    assert admin_rule["from"] == [namespace("monitoring")]


def test_grpc_namespaces_become_namespace_selectors_before_the_raw_peers(render):
    raw = {"ipBlock": {"cidr": "10.0.0.0/8"}}
    r = render({"networkPolicy": {"enabled": True, "grpcNamespaces": ["builds", "ci"], "grpcFrom": [raw]}})
    grpc_rule, _ = rules(r)
    assert grpc_rule["from"] == [namespace("builds"), namespace("ci"), raw, helm_test_peer(r)]


def test_monitoring_namespace_and_admin_peers(render):
    prometheus = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    r = render({"networkPolicy": {"enabled": True, "monitoringNamespace": "observability", "adminFrom": [prometheus]}})
    assert rules(r)[1]["from"] == [namespace("observability"), prometheus]
    # "" and no peers: the admin port is open to every source again.
    r = render({"networkPolicy": {"enabled": True, "monitoringNamespace": ""}})
    assert "from" not in rules(r)[1]


def test_raw_peers_alone(renders):
    # monitoring-values: the raw forms only, with the test Pod on gRPC.
    r = renders["monitoring-values"]
    grpc_rule, admin_rule = rules(r)
    assert grpc_rule["from"] == [*r.values["networkPolicy"]["grpcFrom"], helm_test_peer(r)]
    assert admin_rule["from"] == r.values["networkPolicy"]["adminFrom"]


def test_with_tls_the_test_pod_is_admitted_to_the_admin_port(renders):
    # tls-auth-values: `helm test` checks readiness on the admin port.
    r = renders["tls-auth-values"]
    grpc_rule, admin_rule = rules(r)
    assert grpc_rule["from"] == [namespace("builds"), namespace("ci")]
    assert admin_rule["from"] == [namespace("monitoring"), helm_test_peer(r)]
    (c,) = r.one("Pod", component="test")["spec"]["containers"]
    assert c["args"][c["args"].index("--addr") + 1].endswith(":9090")


def test_values_say_the_probes_need_no_rule():
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("# -- A NetworkPolicy") : text.index("networkPolicy:")]
    assert "kubelet's probes are not subject to" in " ".join(block.replace("#", " ").split())
    assert yaml.safe_load(text)["networkPolicy"]["monitoringNamespace"] == "monitoring"
