"""storage.backend: "local" runs exactly one pod, "s3" scales and takes its
credentials from a Secret, never from values or the ConfigMap."""

from __future__ import annotations

import pytest

LOCAL_ONE_REPLICA = 'storage.backend "local" keeps blobs on one pod\'s disk'
S3 = {"storage": {"backend": "s3", "s3": {"bucket": "blobs", "existingSecret": "creds"}}}


def render_error(chart, values) -> str:
    with pytest.raises(Exception) as err:
        chart.render(values, name="memgate", namespace="x")
    return str(err.value)


@pytest.mark.parametrize("replicas", [2, 5])
def test_local_backend_refuses_more_than_one_replica(chart, replicas):
    message = render_error(chart, {"replicaCount": replicas})
    assert f"replicaCount is {replicas}" in message
    assert LOCAL_ONE_REPLICA in message
    assert 'set storage.backend to "s3"' in message


def test_local_backend_refuses_autoscaling(chart):
    message = render_error(chart, {"autoscaling": {"enabled": True}})
    assert "autoscaling.enabled" in message and LOCAL_ONE_REPLICA in message
    # Also when the local backend is spelled out next to a ci-style HPA.
    message = render_error(chart, {"storage": {"backend": "local"}, "autoscaling": {"enabled": True, "minReplicas": 1}})
    assert LOCAL_ONE_REPLICA in message


def test_s3_backend_scales(render):
    r = render({**S3, "replicaCount": 4})
    assert r.deployment()["spec"]["replicas"] == 4
    r = render({**S3, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 9}})
    assert "replicas" not in r.deployment()["spec"], "the HPA owns the replica count"
    hpa = r.one("HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 9)
    assert hpa["spec"]["scaleTargetRef"]["name"] == r.deployment()["metadata"]["name"]


@pytest.mark.parametrize(
    "values, wanted",
    [
        ({"storage": {"backend": "s3", "s3": {"existingSecret": "creds"}}}, "set storage.s3.bucket"),
        ({"storage": {"backend": "s3", "s3": {"bucket": "b"}}}, "set storage.s3.existingSecret"),
        ({**S3, "persistence": {"enabled": True}}, "persistence.enabled is for storage.backend \"local\""),
    ],
)
def test_s3_backend_refuses_incomplete_values(chart, values, wanted):
    assert wanted in render_error(chart, values)


@pytest.mark.parametrize("name", ["s3-values", "s3-hpa-values"])
def test_s3_credentials_come_from_the_secret(renders, name):
    r = renders[name]
    s3 = r.values["storage"]["s3"]
    env = {e["name"]: e for e in r.container()["env"]}
    for var, key in [
        ("AWS_ACCESS_KEY_ID", s3.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
        ("AWS_SECRET_ACCESS_KEY", s3.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")),
    ]:
        assert "value" not in env[var], f"{var} must not be inlined"
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": s3["existingSecret"], "key": key}
    if s3.get("sessionTokenKey"):
        assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == s3["sessionTokenKey"]
    else:
        assert "AWS_SESSION_TOKEN" not in env

    # The ConfigMap has the location and no credential at all.
    cfg = r.config()
    assert cfg["storage"]["backend"] == "s3"
    assert cfg["storage"]["s3"]["bucket"] == s3["bucket"]
    assert cfg["storage"]["s3"]["region"] == s3["region"]
    assert cfg["storage"]["s3"].get("credentials_file", "") == ""
    text = r.config_text().lower()
    for word in ["access_key", "secret", "session_token", "password", "credentials_file"]:
        assert word not in text, f"{word!r} in the ConfigMap"
    # No Secret holds them: the credentials exist only in the one the operator
    # made (the chart's only Secrets are the generated token's, when auth has
    # no existingSecret).
    for secret in (o for o in r.objects if o["kind"] == "Secret"):
        assert secret["metadata"]["labels"]["app.kubernetes.io/component"] in {"client-token", "tokens-file"}
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(secret["data"])


def test_s3_location_is_rendered_from_values(renders):
    r = renders["s3-values"]
    s3 = r.config()["storage"]["s3"]
    assert s3 == {
        "endpoint": "http://garage.storage.svc:3900",
        "region": "garage",
        "bucket": "memgate-blobs",
        "prefix": "prod/",
        "path_style": True,
        "part_size": "16MiB",
        "parts_in_flight": 2,
        "request_timeout": "60s",
        "connect_timeout": "3s",
        "max_retries": 5,
        "retry_timeout": "30s",
        "health_interval": "15s",
    }
    # Integers stay integers (Helm hands values over as floats).
    assert "parts_in_flight = 2\n" in r.config_text()
    assert "max_retries = 5\n" in r.config_text()


def test_local_backend_has_no_s3_section_or_credentials(renders):
    r = renders["default"]
    assert r.config()["storage"]["backend"] == "local"
    assert "s3" not in r.config()["storage"]
    assert "env" not in r.container()
