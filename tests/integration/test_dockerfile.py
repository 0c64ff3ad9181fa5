"""The Dockerfile, without a container engine (an integration test: it runs pip and a sidecar): its facts are checked by parsing it, and its
build-stage RUN steps are run as written (paths moved into a temp dir) in a fresh virtualenv; the
result must print its version and pass the image's own HEALTHCHECK against a running sidecar."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pgsidecar import __version__
from tests.fixtures.tools import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage: comments dropped, backslash continuations joined."""
    stages: list[Stage] = []
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    for line in logical.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            parts = args.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_two_stages_on_a_slim_python(stages):
    assert [s.base for s in stages] == ["python:3.12-slim", "python:3.12-slim"]
    assert stages[0].name == "build"


def test_final_stage_runs_as_a_non_root_user(stages):
    final = stages[-1]
    user = final.last("USER")
    assert user is not None and user.split(":")[0] not in ("root", "0")
    uid = int(user.split(":")[0])
    assert any(f"--uid {uid}" in run for run in final.all("RUN")), "the user exists in the image"


def test_ports_entrypoint_and_config(stages):
    final = stages[-1]
    assert sorted(final.last("EXPOSE").split()) == ["6432", "9188"]
    assert json.loads(final.last("ENTRYPOINT")) == ["pgsidecar", "run"]
    env = env_of(final)
    assert env["PGSIDECAR_CONFIG"] == "/etc/pgsidecar/pgsidecar.yaml"
    assert env["PGSIDECAR_METRICS_LISTEN"].endswith(":9188")
    assert any(args.endswith("/etc/pgsidecar/pgsidecar.yaml") for args in final.all("COPY"))
    assert "--from=build" in " ".join(final.all("COPY"))


def test_healthcheck_uses_livez_without_curl(stages):
    check = stages[-1].last("HEALTHCHECK")
    assert check is not None and "/livez" in check
    assert "curl" not in check and "wget" not in check
    command = json.loads(check.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_copied_files_exist_and_are_not_dockerignored(stages):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in stages:
        for args in stage.all("COPY"):
            if args.startswith("--from"):
                continue
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert not _ignored(src, patterns), f"{src} is excluded by .dockerignore"
    assert _ignored(".venv", patterns) and _ignored(".git", patterns)


def _rewrite(command: str, moves: dict[str, str]) -> str:
    for old, new in moves.items():
        command = command.replace(old, new)
    return command


@pytest.mark.slow
def test_build_stage_steps_install_a_working_pgsidecar(stages, tmp_path):
    """Run the build stage as written: COPY into a source dir, each RUN in a shell, with the
    image's absolute paths moved under tmp_path; then the image's HEALTHCHECK against it."""
    build = stages[0]
    workdir = tmp_path / "src"
    workdir.mkdir()
    for args in build.all("COPY"):
        *sources, dest = args.split()
        target = workdir / dest if dest not in ("./", ".") else workdir
        for src in sources:
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / src, workdir / Path(src).name)
    moves = {"/opt/pgsidecar": str(tmp_path / "venv"), "/tmp/wheels": str(tmp_path / "wheels")}
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSIDECAR_", "VIRTUAL_ENV"))}
    env.update(env_of(build), PATH=f"{shim}:{os.environ['PATH']}")
    started = time.monotonic()
    for run in build.all("RUN"):
        proc = subprocess.run(
            ["sh", "-ec", _rewrite(run, moves)], cwd=workdir, env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, f"RUN {run}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    print(f"build stage took {time.monotonic() - started:.1f}s")
    venv_bin = tmp_path / "venv" / "bin"
    out = subprocess.run([str(venv_bin / "pgsidecar"), "version"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == f"pgsidecar {__version__}"
    # Installed from the wheel, not from this tree.
    where = subprocess.run(
        [str(venv_bin / "python"), "-c", "import pgsidecar; print(pgsidecar.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    ).stdout
    assert str(tmp_path / "venv") in where
    _healthcheck_passes(stages[-1], venv_bin, tmp_path)


def _healthcheck_passes(final: Stage, venv_bin: Path, tmp_path: Path) -> None:
    """Start the installed sidecar with the image's ENV and run the HEALTHCHECK command."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "VIRTUAL_ENV"))}
    env.update(env_of(final))
    env.update(
        PATH=f"{venv_bin}:{os.environ['PATH']}",
        PGSIDECAR_CONFIG=str(ROOT / "config" / "pgsidecar.yaml"),
        PGSIDECAR_METRICS_LISTEN=f"127.0.0.1:{port}",
        PGSIDECAR_LISTEN_PORT="0",
        PGSIDECAR_UPSTREAM_DSN=f"host=127.0.0.1 port={free_port()} sslmode=disable",
    )
    entry = json.loads(final.last("ENTRYPOINT"))
    with open(tmp_path / "sidecar.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(entry, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        command = json.loads(final.last("HEALTHCHECK").split("CMD", 1)[1])
        command = [c.replace("127.0.0.1:9188", f"127.0.0.1:{port}") for c in command]
        command[0] = str(venv_bin / command[0])
        deadline = time.monotonic() + 20
        while True:
            rc = subprocess.run(command, capture_output=True, timeout=10).returncode
            if rc == 0:
                break
            assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.2)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, (tmp_path / "sidecar.log").read_text()
