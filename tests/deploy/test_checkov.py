"""checkov over everything that gets deployed: every render of the chart, k8s/
and the Dockerfile, in one run. No check may fail; a check may be skipped only
in the file itself, with a written reason. A planted bad manifest and
Dockerfile prove that the scan really runs and can fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import K8S, ROOT, value_sets

CANARY_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: canary
  namespace: canary
spec:
  containers:
    - name: c
      image: busybox
      securityContext:
        privileged: true
"""
CANARY_DOCKERFILE = "FROM debian:latest\nRUN echo hi\n"


def decode_all(text: str) -> list[dict]:
    """checkov prints one JSON report, or a list of them (one per framework)."""
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


@pytest.fixture(scope="session")
def checkov_reports(rendered_dir, tmp_path_factory) -> list[dict]:
    scan = tmp_path_factory.mktemp("checkov")
    shutil.copytree(rendered_dir, scan / "rendered")
    shutil.copytree(K8S, scan / "k8s")
    (scan / "docker").mkdir()
    shutil.copy(ROOT / "Dockerfile", scan / "docker" / "Dockerfile")
    (scan / "canary").mkdir()
    (scan / "canary" / "pod.yaml").write_text(CANARY_POD)
    (scan / "canary" / "Dockerfile").write_text(CANARY_DOCKERFILE)
    checkov = Path(sys.executable).with_name("checkov")
    env = {
        **os.environ,
        # Offline: no mapping download, no platform, no update check.
        "BC_SKIP_MAPPING": "TRUE",
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE",
    }
    env.pop("BC_API_KEY", None)
    result = subprocess.run(
        [str(checkov), "--skip-download", "--framework", "kubernetes", "dockerfile", "--output", "json", "--compact", "-d", str(scan)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    # 1 means "some check failed" (the canaries do); anything else is a crash.
    assert result.returncode in (0, 1), result.stderr[-2000:]
    return decode_all(result.stdout)


def checks(reports, outcome):
    for report in reports:
        for check in report["results"].get(outcome, []):
            yield report["check_type"], check


def test_scanned_everything(checkov_reports):
    types = {r["check_type"] for r in checkov_reports}
    assert types == {"kubernetes", "dockerfile"}
    passed_files = {c["file_path"].split("/")[1] for _, c in checks(checkov_reports, "passed_checks")}
    assert {"rendered", "k8s", "docker"} <= passed_files
    rendered = {c["file_path"].split("/")[2] for _, c in checks(checkov_reports, "passed_checks") if c["file_path"].startswith("/rendered/")}
    assert rendered == set(value_sets()), "a value set's render was not scanned"
    for report in checkov_reports:
        assert report["summary"]["parsing_errors"] == 0, report["results"].get("parsing_errors")


def test_the_canaries_fail(checkov_reports):
    failed = {(c["check_id"], c["file_path"]) for _, c in checks(checkov_reports, "failed_checks")}
    assert ("CKV_K8S_16", "/canary/pod.yaml") in failed  # privileged container
    assert ("CKV_DOCKER_3", "/canary/Dockerfile") in failed  # no USER


def test_no_failed_checks(checkov_reports):
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} in {c['file_path']}"
        for _, c in checks(checkov_reports, "failed_checks")
        if not c["file_path"].startswith("/canary/")
    ]
    assert failed == []


def test_every_skip_has_a_reason(checkov_reports):
    skipped = list(checks(checkov_reports, "skipped_checks"))
    assert skipped, "expected the documented skips (see the checkov.io/skip annotations)"
    for _, c in skipped:
        reason = (c["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) >= 30 and " " in reason, f"{c['check_id']} in {c['file_path']} skipped without a reason"
