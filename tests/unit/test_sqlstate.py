"""pgsidecar/wire/sqlstate.py: the constants the code uses exist, and the file is what
tools/gen_sqlstate.py makes of PostgreSQL's errcodes.txt (when a copy is on this machine)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pgsidecar.wire import sqlstate
from tools import gen_sqlstate

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for top in ("pgsidecar", "tests", "bench", "tools") for p in (REPO / top).rglob("*.py"))
MODULE = "pgsidecar.wire.sqlstate"

#: What the committed file (PostgreSQL 17's errcodes.txt, see its docstring) has that older
#: servers' files do not, and the reverse, by major version.
ONLY_IN_17 = {"TRANSACTION_TIMEOUT": "25P04", "DEPENDENT_OBJECTS_DOES_NOT_EXIST": "2BP02"}
GONE_IN_17 = {"SNAPSHOT_TOO_OLD": "72000"}


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    anchor = _module_of(path).split(".")
    if path.name != "__init__.py":
        anchor = anchor[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def used_names(path: Path) -> set[str]:
    """Names read from the sqlstate module: `sqlstate.X` (under any alias) and `from ... import X`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: set[str] = set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(path, node)
            for alias in node.names:
                if f"{base}.{alias.name}" == MODULE:
                    aliases.add(alias.asname or alias.name)
                elif base == MODULE:
                    names.add(alias.name)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name == MODULE and a.asname)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            names.add(node.attr)
    return names


def test_the_scan_finds_the_uses_it_must_judge() -> None:
    """Guard against a scan that finds nothing and passes vacuously."""
    assert {"ADMIN_SHUTDOWN", "TOO_MANY_CONNECTIONS"} <= used_names(REPO / "pgsidecar/runtime/listener.py")
    assert "PROTOCOL_VIOLATION" in used_names(REPO / "pgsidecar/drops/classify.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_constant_used_exists(path: Path) -> None:
    missing = sorted(name for name in used_names(path) if not hasattr(sqlstate, name))
    assert missing == [], f"{path.relative_to(REPO)} uses names sqlstate.py lacks: {missing}"


def committed() -> dict[str, str]:
    """The generated constants of the committed file: NAME -> code."""
    return {k: v for k, v in vars(sqlstate).items() if k.isupper() and isinstance(v, str)}


def test_the_generator_reads_what_the_file_holds() -> None:
    """Rendering the committed tables back as errcodes.txt and regenerating gives the same file."""
    text = Path(sqlstate.__file__).read_text(encoding="utf-8")
    lines = []
    for cls, title in sqlstate.CLASSES.items():
        lines.append(f"Section: Class {cls} - {title}")
        block = text.split(f"\n# Class {cls}: {title}\n", 1)[1].split("\n\n", 1)[0]
        for name, code in re.findall(r'^(\w+) = "(\w{5})"$', block, re.M):
            spec = sqlstate.NAMES.get(code, "")
            lines.append(f"{code}    E    ERRCODE_{name}    {spec}")
    assert gen_sqlstate.splice(text, gen_sqlstate.render(gen_sqlstate.parse(lines))) == text


ERRCODES = sorted(Path("/usr/share/postgresql").glob("*/errcodes.txt"))


@pytest.mark.skipif(not ERRCODES, reason="no errcodes.txt on this machine (Debian: postgresql-NN)")
@pytest.mark.parametrize("path", ERRCODES, ids=lambda p: p.parent.name)
def test_regenerating_gives_the_same_constants(path: Path) -> None:
    major = int(path.parent.name)
    if major > 17:
        pytest.skip(f"PostgreSQL {major} is newer than the committed file: regenerate and review")
    got = gen_sqlstate.parse(path.read_text(encoding="utf-8").splitlines())
    regenerated = {name: code for _cls, name, code in got.constants}
    want = committed()
    if major < 17:
        want = {k: v for k, v in want.items() if k not in ONLY_IN_17} | GONE_IN_17
    assert regenerated == want
    shared = set(regenerated.values()) & set(committed().values())
    assert {c: n for c, n in got.names.items() if c in shared} == {
        c: n for c, n in sqlstate.NAMES.items() if c in shared
    }
