"""Shared fixtures for the deployment checks: the chart, its value sets, and
renders of it through the real Helm library (helm-python-sdk's libhelm_c).

Run through scripts/deploy-check.sh, which installs the pinned tools into
target/deploy-venv. Nothing here needs a cluster, a container engine or the
network.
"""

from __future__ import annotations

import copy
import os
import pathlib
import tomllib
from dataclasses import dataclass, field

import helm_python
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "memgate"
K8S = ROOT / "k8s"
# The release name and namespace every render uses. "memgate" as the release
# name gives resources the plain name "memgate", as in k8s/.
RELEASE = "memgate"
NAMESPACE = "memgate-system"
# What an install must give: nothing. Auth is on by default, and without
# auth.existingSecret the chart generates the token and the tokens-file Secret
# (named memgate-tokens for this release, the Secret k8s/ mounts). "default"
# below means the chart's defaults alone.
REQUIRED: dict = {}


def ci_value_files() -> list[pathlib.Path]:
    return sorted((CHART / "ci").glob("*.yaml"))


def value_sets() -> dict[str, dict]:
    """The chart's defaults (with REQUIRED) and every ci/*.yaml set, by name.
    The ci sets stand alone, as `ct lint` and `helm install -f` use them."""
    sets = {"default": copy.deepcopy(REQUIRED)}
    for path in ci_value_files():
        sets[path.stem] = yaml.safe_load(path.read_text()) or {}
    return sets


def merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, maps merged key by key, as Helm merges -f files."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deploy_section() -> str:
    """docs/deploy.md, the deployment guide (once the README's "Deploy on
    Kubernetes" section)."""
    return (ROOT / "docs" / "deploy.md").read_text()


@dataclass
class Render:
    """One render of the chart: its files and the objects in them."""

    name: str
    values: dict
    files: dict[str, str]
    # (template path, object) for every object, in template order.
    located: list[tuple[str, dict]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for path, text in sorted(self.files.items()):
            if not path.endswith(".yaml"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.located.append((path, doc))

    @property
    def objects(self) -> list[dict]:
        return [o for _, o in self.located]

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def one(self, kind: str, component: str | None = None) -> dict:
        found = [
            o
            for o in self.objects
            if o["kind"] == kind
            and (component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)
        ]
        assert len(found) == 1, f"{self.name}: expected one {kind}, found {len(found)}"
        return found[0]

    def deployment(self) -> dict:
        return self.one("Deployment")

    def container(self) -> dict:
        containers = self.deployment()["spec"]["template"]["spec"]["containers"]
        (memgate,) = [c for c in containers if c["name"] == "memgate"]
        return memgate

    def config_text(self) -> str:
        return self.one("ConfigMap")["data"]["memgate.toml"]

    def config(self) -> dict:
        return tomllib.loads(self.config_text())

    def manifests(self) -> dict[str, str]:
        """Rendered files that hold Kubernetes objects (not NOTES.txt, not empty)."""
        return {p: t for p, t in self.files.items() if p.endswith(".yaml") and any(yaml.safe_load_all(t))}


@pytest.fixture(scope="session")
def chart():
    with helm_python.Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="session")
def render(chart):
    """render(values, name=..., base=REQUIRED) -> Render, through the real Helm
    template engine. `values` go on top of `base`, so a test names only what it
    is about; pass base={} to render exactly `values`."""

    def _render(values: dict | None = None, name: str = "custom", base: dict = REQUIRED) -> Render:
        values = merged(base, values or {})
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return Render(name=name, values=values, files=files)

    return _render


@pytest.fixture(scope="session")
def renders(render) -> dict[str, Render]:
    """The chart rendered with its defaults and with every ci/*.yaml set."""
    return {name: render(values, name=name, base={}) for name, values in value_sets().items()}


@pytest.fixture(scope="session")
def rendered_dir(renders, tmp_path_factory) -> pathlib.Path:
    """Every render written to a temporary directory, one folder per value set."""
    root = tmp_path_factory.mktemp("rendered")
    for name, r in renders.items():
        folder = root / name
        folder.mkdir()
        for path, text in r.manifests().items():
            (folder / path.replace("/", "_")).write_text(text)
    return root


@pytest.fixture(scope="session")
def memgate_bin() -> pathlib.Path:
    """The memgate binary the Rust build left (scripts/test.sh builds it first)."""
    path = pathlib.Path(os.environ.get("MEMGATE_BIN", ROOT / "target" / "debug" / "memgate"))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"{path} is missing: build it first with `cargo build --bin memgate` "
            "(scripts/test.sh does), or point MEMGATE_BIN at a memgate binary",
            pytrace=False,
        )
    return path
