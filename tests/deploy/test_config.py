"""The rendered memgate.toml loads in the real binary, and the chart knows
every key memgate has (config/memgate.toml documents them all)."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest
import yaml

from conftest import CHART, ROOT, deploy_section, value_sets

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# Keys memgate has that the chart deliberately does not offer: credentials
# reach the pod from a Secret as environment variables, never through a file
# named in the config.
NOT_OFFERED = {"storage.s3.credentials_file", "storage.s3.profile"}


def flatten(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in table.items():
        if isinstance(v, dict):
            keys |= flatten(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def schema_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in node.get("properties", {}).items():
        if v.get("type") == "object" and "properties" in v:
            keys |= schema_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def limits(memgate_bin, path):
    # `memgate limits` loads the config exactly as `serve` does (file, then
    # MEMGATE__* variables, then validate) and exits non-zero on a bad key.
    env = {"PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(memgate_bin), "limits", "--config", str(path)], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize("name", list(value_sets()))
def test_rendered_config_loads_in_memgate(renders, memgate_bin, tmp_path, name):
    path = tmp_path / "memgate.toml"
    path.write_text(renders[name].config_text())
    result = limits(memgate_bin, path)
    assert result.returncode == 0, f"memgate refused the {name} config: {result.stderr.strip()}"
    assert "budget" in result.stdout


def test_memgate_refuses_a_bad_key(memgate_bin, tmp_path):
    # Proves the check above can fail: the same command on a typo'd key.
    path = tmp_path / "memgate.toml"
    path.write_text('[memory]\nbudget_ratoi = 0.5\n')
    result = limits(memgate_bin, path)
    assert result.returncode != 0
    assert "budget_ratoi" in result.stderr


def test_k8s_config_loads_in_memgate(memgate_bin):
    result = limits(memgate_bin, ROOT / "k8s" / "memgate.toml")
    assert result.returncode == 0, result.stderr


def test_chart_offers_every_memgate_key(renders):
    documented = flatten(tomllib.loads((ROOT / "config" / "memgate.toml").read_text()))
    offered = schema_keys(SCHEMA["properties"]["config"])
    # What the chart writes in any of its value sets (S3, TLS, auth...).
    set_by_chart = set().union(*(flatten(r.config()) for r in renders.values())) - offered
    # Everything the chart writes or lets users write is a key memgate has...
    assert offered - documented == set(), "the schema offers keys memgate does not have"
    assert set_by_chart - documented == set(), "the chart writes keys memgate does not have"
    # ...and every key memgate has is either offered, set by the chart, or
    # deliberately left out. A new key in config/memgate.toml fails here until
    # the chart's schema offers it.
    missing = documented - offered - set_by_chart - NOT_OFFERED
    assert missing == set(), f"config keys the chart does not offer: {sorted(missing)}"


def test_sizes_are_strings_in_the_rendered_config(renders):
    # toToml would write a number as a float (268435456.0), which memgate
    # refuses for a size; the schema only lets strings through.
    for r in renders.values():
        for key, value in [(k, v) for k, v in _leaves(r.config())]:
            if key.endswith(("_size", "reserve", "threshold")):
                assert isinstance(value, str), f"{r.name}: {key} = {value!r}"


def _leaves(table, prefix=""):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def docs_value_blocks() -> list[dict]:
    text = deploy_section()
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_docs_examples_render(render):
    blocks = docs_value_blocks()
    assert len(blocks) >= 3
    # The first is a whole my-values.yaml and renders alone; the others show
    # one part each and render next to the tokens Secret every install names.
    first = render(blocks[0], base={})
    assert first.config()["auth"]["enabled"] is True
    for values in blocks[1:]:
        render(values)


def test_docs_budget_is_what_memgate_computes(render, memgate_bin, tmp_path):
    # The memory example in docs/deploy.md quotes the budget its limit gives;
    # memgate computes it from the rendered config and that limit (passed as
    # memory.limit here, where the cgroup would give it in the pod).
    values = docs_value_blocks()[0]
    limit = values["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    limit_bytes = int(limit[:-2]) * 2**30
    path = tmp_path / "memgate.toml"
    path.write_text(render(values).config_text())
    result = subprocess.run(
        [str(memgate_bin), "limits", "--json", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MEMGATE__MEMORY__LIMIT": str(limit_bytes)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    memory = values["config"]["memory"]
    reserve = int(memory["reserve"].removesuffix("MiB")) * 2**20
    assert report["budget_bytes"] == int(limit_bytes * memory["budget_ratio"] - reserve)
    quoted = f"≈ {report['budget_bytes'] / 2**30:.1f} GiB"
    assert quoted in deploy_section()
