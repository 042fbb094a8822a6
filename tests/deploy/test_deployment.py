"""What the rendered Deployment must say for memgate to work in a cluster:
probes on the right health services, the memory limit the guard needs, the
config file where --config looks, and time enough to drain."""

from __future__ import annotations

import re

import pytest

from conftest import value_sets

SETS = list(value_sets())


def seconds(duration: str) -> float:
    """A humantime duration as memgate writes them ("5s", "1m30s", "250ms")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration.replace(" ", ""), duration
    return sum(int(n) * units[u] for n, u in parts)


def container_port(render, name: str) -> int:
    (port,) = [p["containerPort"] for p in render.container()["ports"] if p["name"] == name]
    return port


def grpc_port(render) -> int:
    return container_port(render, "grpc")


def health_port(render) -> int:
    """Where the probes and `helm test` ask: the gRPC port, or with TLS on (which
    the kubelet's gRPC probe cannot speak) the admin port's plaintext health."""
    return container_port(render, "admin" if render.config().get("tls", {}).get("cert_file") else "grpc")


@pytest.mark.parametrize("name", SETS)
def test_probes_ask_the_right_health_services(renders, name):
    r = renders[name]
    c = r.container()
    port = health_port(r)
    # The port the probes dial is one memgate listens on, in plaintext.
    assert r.config()["server"]["grpc_addr"] == f"0.0.0.0:{grpc_port(r)}"
    assert r.config()["admin"]["addr"] == f"0.0.0.0:{container_port(r, 'admin')}"
    probes = r.values.get("probes", {})
    for kind, service in [("startup", ""), ("liveness", ""), ("readiness", "readiness")]:
        probe = c[f"{kind}Probe"]
        if probes.get(kind, {}).get("override"):
            assert probe == probes[kind]["override"]
            continue
        assert probe["grpc"] == {"port": port, "service": service}, f"{kind} probe"
        assert probe["timeoutSeconds"] >= 1 and probe["periodSeconds"] >= 1
    if not probes:
        # The defaults are what the chart documents.
        assert c["readinessProbe"]["grpc"]["service"] == "readiness"
        assert c["livenessProbe"]["grpc"]["service"] == ""
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 30


def test_probe_timings_are_tunable(render):
    r = render({"probes": {"readiness": {"periodSeconds": 3, "failureThreshold": 2, "timeoutSeconds": 4}}})
    probe = r.container()["readinessProbe"]
    assert (probe["periodSeconds"], probe["failureThreshold"], probe["timeoutSeconds"]) == (3, 2, 4)
    assert probe["grpc"]["service"] == "readiness"


@pytest.mark.parametrize("name", SETS)
def test_memory_limit_is_set_and_requested(renders, name):
    r = renders[name]
    resources = r.container()["resources"]
    limit = resources["limits"]["memory"]
    assert limit
    wanted = r.values.get("resources", {}).get("requests", {}).get("memory", limit)
    assert resources["requests"]["memory"] == wanted
    # The guard reads the limit from the cgroup unless the config pins one.
    assert r.config().get("memory", {}).get("limit", "auto") == "auto"


def test_requests_memory_defaults_to_the_limit(render):
    r = render({"resources": {"limits": {"memory": "3Gi"}, "requests": {"cpu": "1"}}})
    assert r.container()["resources"]["requests"] == {"cpu": "1", "memory": "3Gi"}
    assert r.container()["resources"]["limits"] == {"memory": "3Gi"}


@pytest.mark.parametrize("name", SETS)
def test_config_mount_matches_the_config_argument(renders, name):
    r = renders[name]
    pod = r.deployment()["spec"]["template"]["spec"]
    args = r.container()["args"]
    assert args[0] == "serve"
    config_path = args[args.index("--config") + 1]
    mounts = {m["name"]: m for m in r.container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The config volume is the chart's ConfigMap, mounted where --config looks.
    (name_,) = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == r.one("ConfigMap")["metadata"]["name"]]
    mount = mounts[name_]
    items = volumes[name_]["configMap"].get("items")
    file_name = items[0]["path"] if items else "memgate.toml"
    assert f"{mount['mountPath'].rstrip('/')}/{file_name}" == config_path
    assert mount.get("readOnly") is True
    if items:
        assert items[0]["key"] in r.one("ConfigMap")["data"]


@pytest.mark.parametrize("name", SETS)
def test_grace_period_outlasts_drain_and_grace(renders, name):
    r = renders[name]
    shutdown = r.config()["shutdown"]
    needed = seconds(shutdown["drain_delay"]) + seconds(shutdown["grace"])
    assert r.deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed
    # memgate drains on SIGTERM itself; a preStop sleep would only delay it.
    assert "lifecycle" not in r.container()


def test_too_short_grace_period_is_refused(chart):
    with pytest.raises(Exception) as err:
        chart.render({"terminationGracePeriodSeconds": 30}, name="memgate", namespace="x")
    assert "terminationGracePeriodSeconds (30) must exceed" in str(err.value)
    assert "at least 31" in str(err.value)


@pytest.mark.parametrize("name", SETS)
def test_data_dir_is_the_writable_mount(renders, name):
    r = renders[name]
    c = r.container()
    data_dir = r.config()["storage"]["data_dir"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert data_dir in writable
    assert writable <= {data_dir, "/tmp"}


@pytest.mark.parametrize("name", SETS)
def test_security_context_is_hardened(renders, name):
    r = renders[name]
    pod = r.deployment()["spec"]["template"]["spec"]
    for c in [r.container(), r.one("Pod", component="test")["spec"]["containers"][0]]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for sa in [o for o in r.objects if o["kind"] == "ServiceAccount"]:
        assert sa["automountServiceAccountToken"] is False


def test_config_change_rolls_the_pods(render):
    def checksum(values):
        return render(values).deployment()["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum({})
    assert base == checksum({"replicaCount": 1})
    assert base != checksum({"config": {"memory": {"budget_ratio": 0.5}}})
    assert base != checksum({"shutdown": {"drainDelaySeconds": 6, "graceSeconds": 25}})


def test_service_names_both_ports(renders):
    for r in renders.values():
        svc = r.one("Service")
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert set(ports) == {"grpc", "admin"}
        assert ports["grpc"]["appProtocol"] == "grpc"
        assert ports["grpc"]["port"] == grpc_port(r)
        cfg = r.config()
        assert cfg["admin"]["addr"].endswith(f":{ports['admin']['port']}")


def test_helm_test_pod_checks_readiness_through_the_service(renders):
    for r in renders.values():
        pod = r.one("Pod", component="test")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        (c,) = pod["spec"]["containers"]
        assert c["image"] == r.container()["image"], "the test uses the memgate image itself"
        args = c["args"]
        assert args[0] == "health"
        assert args[args.index("--service") + 1] == "readiness"
        svc = r.one("Service")
        assert args[args.index("--addr") + 1] == f"http://{svc['metadata']['name']}:{health_port(r)}"
        # The Service exposes that port under the same number.
        assert health_port(r) in [p["port"] for p in svc["spec"]["ports"]]


def test_local_backend_never_overlaps_pods(renders):
    for r in renders.values():
        strategy = r.deployment()["spec"]["strategy"]["type"]
        assert strategy == ("Recreate" if r.config()["storage"]["backend"] == "local" else "RollingUpdate")


def test_persistence_uses_a_claim(renders):
    r = renders["persistence-values"]
    pvc = r.one("PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    data = [v for v in r.deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"][0]
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    existing = renders["existing-claim-values"]
    assert "PersistentVolumeClaim" not in existing.kinds()
    data = [v for v in existing.deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"][0]
    assert data["persistentVolumeClaim"]["claimName"] == "memgate-blobs"
    assert "emptyDir" in [v for v in renders["default"].deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"][0]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_pick_the_server_pods_and_never_the_test_pod(renders):
    for r in renders.values():
        pod_labels = r.deployment()["spec"]["template"]["metadata"]["labels"]
        test_labels = r.one("Pod", component="test")["metadata"]["labels"]
        selectors = [r.one("Service")["spec"]["selector"], r.deployment()["spec"]["selector"]["matchLabels"]]
        for kind in ["PodDisruptionBudget", "NetworkPolicy"]:
            for obj in [o for o in r.objects if o["kind"] == kind]:
                key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
                selectors.append(obj["spec"][key]["matchLabels"])
        for selector in selectors:
            assert matches(selector, pod_labels), f"{r.name}: {selector} misses the server pods"
            # Otherwise the Service would route calls to the test Pod.
            assert not matches(selector, test_labels), f"{r.name}: {selector} selects the test Pod"
