"""The Dockerfile agrees with the chart and with the binary: ports, user,
config path, data directory, and jemalloc options set only where they differ
from those embedded in the binary. (No container engine here: the image
itself is not built; checkov scans the file in test_checkov.py.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

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


IMAGE_CONFIG = "/out/etc/memgate/memgate.toml"


def config_step() -> str:
    """The build step that writes the image's memgate.toml from config/memgate.toml."""
    (script,) = [a for i, a in stages()[0] if i == "RUN" and f"> {IMAGE_CONFIG}" in a]
    return script


def run_config_step(source_root: Path, out: Path) -> subprocess.CompletedProcess:
    """That step, run here by bash with /out moved under `out`, as the build runs it."""
    script = config_step().replace("/out/", f"{out}/out/")
    return subprocess.run(["bash", "-eu", "-c", script], cwd=source_root, capture_output=True, text=True, timeout=60)


def test_image_config_listens_everywhere_with_the_charts_data_dir(tmp_path):
    result = run_config_step(ROOT, tmp_path)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((tmp_path / IMAGE_CONFIG.lstrip("/")).read_text())
    # memgate's defaults are loopback and ./data; the image's are what the
    # chart writes, so `docker run -p` and a bare pod reach it.
    assert config["storage"]["data_dir"] == VALUES["storage"]["dataDir"]
    assert config["server"]["grpc_addr"] == f"0.0.0.0:{VALUES['ports']['grpc']}"
    assert config["admin"]["addr"] == f"0.0.0.0:{VALUES['ports']['admin']}"
    # Each sed rewrites exactly one line of config/memgate.toml, and nothing
    # else differs from it.
    source = (ROOT / "config" / "memgate.toml").read_text()
    edits = re.findall(r"-e 's\|([^|]*)\|([^|]*)\|'", config_step())
    assert len(edits) == 3
    for pattern, _ in edits:
        assert len(re.findall(pattern, source, re.M)) == 1, f"{pattern} must match one line of config/memgate.toml"
    original = tomllib.loads(source)
    for section, key in [("storage", "data_dir"), ("server", "grpc_addr"), ("admin", "addr")]:
        original[section][key] = config[section][key]
    assert original == config


def test_image_config_step_fails_when_a_line_changes_shape(tmp_path):
    # The greps are what fail the build when config/memgate.toml changes under
    # a sed: here the default gRPC address moved, so the sed misses it.
    (tmp_path / "config").mkdir()
    source = (ROOT / "config" / "memgate.toml").read_text()
    changed = re.sub(r'^grpc_addr = ".*"$', 'grpc_addr = "[::1]:50051"', source, flags=re.M)
    assert changed != source
    (tmp_path / "config" / "memgate.toml").write_text(changed)
    assert run_config_step(tmp_path, tmp_path).returncode != 0


def test_image_config_loads_in_memgate(memgate_bin, tmp_path):
    assert run_config_step(ROOT, tmp_path).returncode == 0
    result = subprocess.run(
        [str(memgate_bin), "limits", "--config", str(tmp_path / IMAGE_CONFIG.lstrip("/"))],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_healthcheck_asks_the_admin_port():
    # The admin port's gRPC health service stays plaintext with [tls] on, so
    # the same check works whether or not the gRPC port speaks TLS.
    runtime = dict(stages()[-1])
    options, _, command = runtime["HEALTHCHECK"].partition("CMD ")
    cmd = exec_form(command)
    assert cmd[:2] == ["/usr/local/bin/memgate", "health"]
    assert cmd[cmd.index("--addr") + 1] == f"http://127.0.0.1:{VALUES['ports']['admin']}"
    assert cmd[cmd.index("--service") + 1] == ""


def embedded_malloc_conf() -> dict[str, str]:
    # The binary embeds the guard's options and the heap profiler's together.
    source = (ROOT / "src" / "admin" / "pprof.rs").read_text()
    conf = re.search(r'MALLOC_CONF_C: &std::ffi::CStr =\s*c"([^"]*)"', source).group(1)
    return dict(opt.split(":", 1) for opt in conf.split(","))


def test_malloc_conf_only_where_it_differs_from_the_binary():
    embedded = embedded_malloc_conf()
    assert embedded, "no embedded jemalloc options found in src/admin/pprof.rs"
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
    # A folder the build copies whole but .dockerignore narrows (bench/: its
    # manifest and sources) counts as what .dockerignore lets in of it.
    narrowed = set()
    for source in sources:
        narrowed |= {a for a in allowed if a.startswith(source + "/")} or {source}
    assert narrowed == allowed
    assert "target" not in allowed and ".git" not in allowed
