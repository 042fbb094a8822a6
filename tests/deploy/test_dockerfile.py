"""The Dockerfile agrees with the chart and with the binary: ports, user,
config path, data directory, and jemalloc options set only where they differ
from those embedded in the binary. (No container engine here: the image
itself is not built; checkov scans the file in test_checkov.py.)"""

from __future__ import annotations

import json
import re
import shlex

import yaml

from conftest import CHART, ROOT

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            joined.append((word.upper(), rest.strip()))
        current = ""
    return joined


DOCKERFILE = (ROOT / "Dockerfile").read_text()
ALL = instructions(DOCKERFILE)


def stages() -> list[list[tuple[str, str]]]:
    out = []
    for ins in ALL:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def test_build_stage_uses_cache_mounts_and_smoke_runs_the_binary():
    build = stages()[0]
    assert re.match(r"rust:\$\{RUST_VERSION\}-\S+ AS build", build[0][1]) or build[0][1].startswith("rust:")
    runs = [a for i, a in build if i == "RUN" and "cargo build" in a]
    assert len(runs) == 1
    run = runs[0]
    assert "--mount=type=cache,target=/usr/local/cargo/registry" in run
    assert re.search(r"--mount=type=cache,target=/src/target\b", run)
    assert "--locked" in run and "--release" in run
    # The smoke run comes after the build, in the same step.
    assert run.index("cargo build") < run.index("memgate --version")


def test_runtime_stage_is_minimal_and_non_root():
    runtime = stages()[-1]
    base = runtime[0][1]
    assert base.startswith(("gcr.io/distroless/cc", "debian:")) and ("slim" in base or "distroless" in base)
    copies = [a for i, a in runtime if i == "COPY"]
    targets = sorted(c.split()[-1] for c in copies)
    assert targets == ["/etc/memgate/memgate.toml", "/usr/local/bin/memgate", "/var/lib/memgate"]
    (user,) = [a for i, a in runtime if i == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) != 0 and int(uid) == VALUES["securityContext"]["runAsUser"]
    assert int(gid) == VALUES["securityContext"]["runAsGroup"]
    assert f"--chown={uid}:{gid} /out/var/lib/memgate /var/lib/memgate" in " ".join(copies)


def test_ports_entrypoint_and_config_path_match_the_chart(renders):
    runtime = dict((i, a) for i, a in stages()[-1])
    exposed = {int(p.split("/")[0]) for p in runtime["EXPOSE"].split()}
    assert exposed == {VALUES["ports"]["grpc"], VALUES["ports"]["admin"]}
    entrypoint = exec_form(runtime["ENTRYPOINT"])
    assert entrypoint == ["/usr/local/bin/memgate"]
    cmd = exec_form(runtime["CMD"])
    # The chart's args replace CMD and run against the same entrypoint.
    assert renders["default"].container()["args"] == cmd
    assert "command" not in renders["default"].container()


def test_image_config_uses_the_charts_data_dir():
    script = " ".join(a for i, a in stages()[0] if i == "RUN" and "data_dir" in a)
    sed = re.search(r"sed '(s\|[^']*)'", script).group(1)
    _, pattern, replacement, _ = sed.split("|")
    config = (ROOT / "config" / "memgate.toml").read_text()
    assert re.search(pattern, config, re.M), "the sed no longer matches config/memgate.toml"
    assert replacement == f'data_dir = "{VALUES["storage"]["dataDir"]}"'


def embedded_malloc_conf() -> dict[str, str]:
    source = (ROOT / "src" / "guard" / "jemalloc.rs").read_text()
    conf = re.search(r'EMBEDDED_MALLOC_CONF_C: &std::ffi::CStr =\s*c"([^"]*)"', source).group(1)
    return dict(opt.split(":", 1) for opt in conf.split(","))


def test_malloc_conf_only_where_it_differs_from_the_binary():
    embedded = embedded_malloc_conf()
    assert embedded, "no embedded jemalloc options found in src/guard/jemalloc.rs"
    for i, args in ALL:
        if i != "ENV" or "_RJEM_MALLOC_CONF" not in args:
            continue
        value = shlex.split(args.split("=", 1)[1])[0]
        for opt in value.split(","):
            key, _, val = opt.partition(":")
            assert embedded.get(key) != val, f"_RJEM_MALLOC_CONF repeats the embedded {key}:{val}"
    # The comment that says why none is set names the options actually embedded.
    for key, val in embedded.items():
        assert f"{key}:{val}" in DOCKERFILE


def test_dockerignore_keeps_the_context_to_what_the_build_copies():
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines[1:] if l.startswith("!")}
    for name in allowed:
        assert (ROOT / name).exists(), f".dockerignore allows {name}, which does not exist"
    sources = set()
    for i, args in stages()[0]:
        if i == "COPY" and "--from" not in args:
            parts = args.split()
            sources |= {p.rstrip("/") for p in parts[:-1]}
    assert sources == allowed
    assert "target" not in allowed and ".git" not in allowed
