"""deploy/docker/Dockerfile and .dockerignore, checked without a Docker engine.

There is no Docker engine here, so the image is not built; these tests read the
Dockerfile as the builder would (instructions, stages, build context filtered by
.dockerignore) and check what issue 7 asks of it and what a build depends on.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cmake", "npm", "node", "pip")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined."""
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.I)
            assert m, f"unreadable FROM: {rest}"
            stages.append(Stage(m.group(2) or str(len(stages)), m.group(1)))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, got {keyword}"
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return global_args, stages


def _pattern(p: str) -> re.Pattern[str]:
    p = p.strip().strip("/")
    out = ""
    i = 0
    while i < len(p):
        if p.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif p.startswith("**", i):
            out += ".*"
            i += 2
        elif p[i] == "*":
            out += "[^/]*"
            i += 1
        elif p[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(p[i])
            i += 1
    return re.compile(out)


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            result = not negate
    return result


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _pattern(line.lstrip("!"))))
    return rules


GLOBAL_ARGS, STAGES = parse(DOCKERFILE.read_text())
RUNTIME = STAGES[-1]


def test_multi_stage_with_a_slim_non_root_runtime() -> None:
    names = [s.name for s in STAGES]
    assert len(STAGES) >= 3 and len(set(names)) == len(names), names
    assert RUNTIME.name == "runtime"
    base = RUNTIME.base.replace("${PYTHON_IMAGE}", GLOBAL_ARGS.get("PYTHON_IMAGE", ""))
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    (user,) = RUNTIME.args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), (
        "numeric, non-zero uid, so Kubernetes' runAsNonRoot can verify it"
    )
    created = " ".join(RUNTIME.args("RUN"))
    assert f"--uid {uid}" in created, "the runtime user is created in the runtime stage"


def test_no_build_tools_in_the_runtime_stage() -> None:
    runs = " ".join(RUNTIME.args("RUN"))
    assert "apt-get install" not in runs and "pip install" not in runs, runs
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", runs), f"{tool} in runtime: {runs}"
    earlier = {s.name for s in STAGES[:-1]}
    for copy in RUNTIME.args("COPY"):
        m = re.match(r"--from=(\S+)", copy)
        assert m and m.group(1) in earlier, f"runtime copies only build results: COPY {copy}"


def test_torch_is_the_projects_pin_with_a_cpu_default_and_a_cuda_variant() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # torch is the services' extra (the SDK's core package runs without pulling it).
    assert not [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    pins = [d for d in pyproject["project"]["optional-dependencies"]["server"] if d.startswith("torch")]
    assert pins == ["torch==2.13.0"]
    builder = next(s for s in STAGES if s.name == "builder")
    assert "TORCH_VARIANT=cpu" in builder.args("ARG")
    torch_run = next(r for r in builder.args("RUN") if "torch" in r and "index-url" in r)
    assert '"torch==2.13.0"' in torch_run or " torch==2.13.0" in torch_run
    assert "/whl/${TORCH_VARIANT}" in torch_run, "the variant picks the wheel index (cpu, cu130)"
    assert "cu130" in DOCKERFILE.read_text(), "the CUDA build command is documented"


def test_every_service_entry_point_is_installed() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for service in ("trainer", "streamer", "inference", "gateway"):
        assert f"tensorwire-{service}" in scripts, service
    builder = next(s for s in STAGES if s.name == "builder")
    check = next(r for r in builder.args("RUN") if "import torch" in r)
    modules = re.findall(r"services\.\w+\.\w+", check)
    assert {f"services.{s}.app" for s in ("trainer", "streamer", "inference", "gateway")} <= set(modules)
    for module in modules:
        assert (ROOT / module.replace(".", "/")).with_suffix(".py").is_file(), module


def test_context_copies_exist_and_pass_dockerignore() -> None:
    rules = dockerignore_rules()
    copied = []
    for stage in STAGES:
        for copy in stage.args("COPY"):
            if copy.startswith("--from"):
                continue
            *sources, _dest = shlex.split(copy)
            for src in sources:
                path = (ROOT / src).resolve()
                assert path.exists(), f"COPY {src}: not in the repository"
                rel = src.rstrip("/")
                assert not ignored(rel, rules), f"COPY {src}: excluded by .dockerignore"
                copied.append(path)
    assert ROOT / "pyproject.toml" in copied and ROOT / "services" in copied


@pytest.mark.parametrize(
    "path, expect_ignored",
    [
        (".venv/bin/python", True), ("var/models/spiral/1/model.pt", True), (".git/HEAD", True),
        ("clients/web/node_modules/esbuild/package.json", True), ("clients/web/dist/app.js", True),
        ("tests/conftest.py", True), ("tensorwire/__pycache__/x.cpython-311.pyc", True),
        ("tensorwire/rpc/server.py", False), ("services/trainer/app.py", False),
        ("pyproject.toml", False), ("clients/web/src/main.ts", False),
    ],
)
def test_dockerignore_keeps_the_context_small(path: str, expect_ignored: bool) -> None:
    assert ignored(path, dockerignore_rules()) is expect_ignored
