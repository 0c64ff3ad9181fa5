"""docs/architecture.md, import arrows: walk every module of pgsidecar/ with ``ast`` and fail on a wrong arrow.

Each module belongs to a layer (its first package under pgsidecar/, or app/demo/cli at the top).
A layer may import the layers docs/architecture.md lists for it, the standard library, and the third-party
packages named here; only runtime/ and observe/ (and the composition root) may touch asyncio,
socket, ssl or time, so the protocol brain stays sans-IO and testable without a loop.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import pgsidecar

PACKAGE_DIR = Path(pgsidecar.__file__).resolve().parent

#: The composition root: may import anything; nothing but the root imports it. demo_cluster.py
#: is demo.py's throwaway server.
ROOT_LAYERS = frozenset({"app", "demo", "demo_cluster", "cli", "__main__"})

#: Internal layers each layer may import (docs/architecture.md). ``package`` is
#: pgsidecar/__init__.py (the version string), which anyone may read.
ALLOWED_LAYERS: dict[str, frozenset[str]] = {
    "wire": frozenset({"wire"}),
    "auth": frozenset({"auth", "wire"}),
    "session": frozenset({"session", "wire"}),
    # report.py reads `--since 2d` with the configuration's one duration syntax.
    "drops": frozenset({"drops", "wire", "config"}),
    "relay": frozenset({"relay", "wire", "auth", "session", "drops"}),
    "config": frozenset({"config"}),
    "observe": frozenset({"observe", "drops", "config"}),
    # The brain derives SCRAM channel binding from the certificate, so runtime needs no auth.
    "runtime": frozenset({"runtime", "relay", "config", "observe", "wire"}),
}

#: Third-party distributions each layer may import (top-level module names).
ALLOWED_THIRD_PARTY: dict[str, frozenset[str]] = {
    "wire": frozenset(),
    "auth": frozenset(),
    "session": frozenset(),
    "drops": frozenset(),
    "relay": frozenset(),
    "config": frozenset({"yaml"}),
    "observe": frozenset({"prometheus_client"}),
    # tls.py generates and reads certificates; app.py installs uvloop; credentials.py imports
    # each cloud's own library lazily, from its optional extra (pgsidecar[aws|gcp|azure]).
    "runtime": frozenset({"cryptography", "uvloop", "botocore", "google", "azure"}),
}

#: Modules that mean I/O or a clock: allowed only in these layers.
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "time"})
IO_LAYERS = frozenset({"runtime", "observe"}) | ROOT_LAYERS


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module, e.g. "pgsidecar.relay.connection"
    target: str  # the absolute name imported, e.g. "pgsidecar.wire.frames" or "asyncio"
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """``pgsidecar.relay.connection`` -> ``relay``; ``pgsidecar`` -> ``package``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def imports_of(module: str, source: str, *, is_package: bool = False) -> list[Import]:
    """Every import in the module, anywhere (functions and TYPE_CHECKING blocks included)."""
    out: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "pgsidecar":
                # ``from pgsidecar import relay`` imports a module; ``from pgsidecar import
                # __version__`` a name of the package itself.
                out += [Import(module, _submodule_or_package(base, alias.name), node.lineno) for alias in node.names]
            else:
                out.append(Import(module, base, node.lineno))
    return out


def _submodule_or_package(base: str, name: str) -> str:
    path = PACKAGE_DIR.parent.joinpath(*base.split("."), name)
    if name != "*" and (path.is_dir() or path.with_suffix(".py").is_file()):
        return f"{base}.{name}"
    return base


def violations(imp: Import) -> list[str]:
    """What is wrong with one import arrow, as readable sentences (empty: fine)."""
    src = layer_of(imp.module)
    where = f"{imp.module}:{imp.line} imports {imp.target}"
    top = imp.target.split(".")[0]
    problems: list[str] = []
    if top == "pgsidecar":
        dst = layer_of(imp.target)
        if dst in ROOT_LAYERS and src not in ROOT_LAYERS:
            problems.append(f"{where}: nothing outside the composition root imports {dst}")
        elif src not in ROOT_LAYERS and dst != "package" and dst not in ALLOWED_LAYERS.get(src, frozenset()):
            problems.append(f"{where}: {src} may not use {dst}")
        return problems
    if top in IO_MODULES and src not in IO_LAYERS:
        problems.append(f"{where}: only runtime/ and observe/ may import {top}")
    if top in sys.stdlib_module_names or src in ROOT_LAYERS:
        return problems
    if top not in ALLOWED_THIRD_PARTY.get(src, frozenset()):
        problems.append(f"{where}: {src} may not use the third-party package {top}")
    return problems


def all_imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        found += imports_of(module_name(path), path.read_text(), is_package=path.name == "__init__.py")
    return found


ALL_IMPORTS = all_imports()
MODULES = sorted({module_name(p) for p in PACKAGE_DIR.rglob("*.py")})

#: Known wrong arrows in the current code, each xfailed with its reason until fixed.
KNOWN_VIOLATIONS: dict[str, str] = {}


def test_every_module_belongs_to_a_known_layer() -> None:
    known = set(ALLOWED_LAYERS) | ROOT_LAYERS | {"package"}
    assert {layer_of(m) for m in MODULES} <= known, sorted({layer_of(m) for m in MODULES} - known)


def test_the_walk_sees_the_imports_it_must_judge() -> None:
    """Guard against a walk that finds nothing and passes vacuously."""
    targets = {(i.module, i.target) for i in ALL_IMPORTS}
    assert ("pgsidecar.relay.relaying", "pgsidecar.wire.frames") in targets
    assert ("pgsidecar.runtime.driver", "asyncio") in targets
    assert ("pgsidecar.config.load", "yaml") in targets
    # Imports inside functions (cli.py imports lazily) count too.
    assert ("pgsidecar.cli", "pgsidecar.app") in targets


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_one_way(module: str) -> None:
    if module in KNOWN_VIOLATIONS:
        pytest.xfail(KNOWN_VIOLATIONS[module])
    problems = [p for imp in ALL_IMPORTS if imp.module == module for p in violations(imp)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "fragment"),
    [
        ("pgsidecar.wire.frames", "import asyncio", "only runtime/ and observe/ may import asyncio"),
        ("pgsidecar.relay.connection", "from time import monotonic", "may import time"),
        ("pgsidecar.session.pending", "import socket", "may import socket"),
        ("pgsidecar.wire.frames", "from pgsidecar.session.pending import Owner", "wire may not use session"),
        ("pgsidecar.auth.scram", "from pgsidecar.relay import commands", "auth may not use relay"),
        ("pgsidecar.drops.classify", "from pgsidecar.relay.events import Timer", "drops may not use relay"),
        ("pgsidecar.session.state", "from ..relay import events", "session may not use relay"),
        (
            "pgsidecar.relay.connection",
            "from pgsidecar.runtime.driver import ClientDriver",
            "relay may not use runtime",
        ),
        ("pgsidecar.relay.connection", "from pgsidecar.config.model import Config", "relay may not use config"),
        ("pgsidecar.config.load", "from pgsidecar.observe import logs", "config may not use observe"),
        ("pgsidecar.runtime.driver", "from pgsidecar.app import run", "nothing outside the composition root"),
        ("pgsidecar.wire.backend", "import yaml", "third-party package yaml"),
        ("pgsidecar.relay.connection", "import uvloop", "third-party package uvloop"),
        ("pgsidecar.observe.logs", "from pgsidecar.relay import connection", "observe may not use relay"),
        (
            "pgsidecar.runtime.listener",
            "from pgsidecar.auth.scram import tls_server_end_point",
            "runtime may not use auth",
        ),
        ("pgsidecar.wire.frames", "from pgsidecar import relay", "wire may not use relay"),
        ("pgsidecar.drops.record", "from . import classify\nfrom .. import session", "drops may not use session"),
    ],
)
def test_the_checker_catches_wrong_arrows(module: str, source: str, fragment: str) -> None:
    problems = [p for imp in imports_of(module, source) for p in violations(imp)]
    assert any(fragment in p for p in problems), problems


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("pgsidecar.runtime.driver", "import asyncio\nimport ssl\nfrom pgsidecar.relay import commands"),
        ("pgsidecar.observe.logs", "import time"),
        ("pgsidecar.app", "import asyncio\nimport uvloop\nfrom pgsidecar.demo import main"),
        ("pgsidecar.relay.login", "from pgsidecar.auth.scram import ScramClient\nimport random"),
        ("pgsidecar.config.load", "import yaml"),
        ("pgsidecar.wire.frames", "from .errors import ClientProtocolError"),
        ("pgsidecar.cli", "from pgsidecar import __version__"),
        ("pgsidecar.runtime.http", "from pgsidecar import __version__"),
        ("pgsidecar.relay.connection", "from pgsidecar.wire import frontend as fe"),
    ],
)
def test_the_checker_allows_right_arrows(module: str, source: str) -> None:
    problems = [p for imp in imports_of(module, source) for p in violations(imp)]
    assert problems == []
