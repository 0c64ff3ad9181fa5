"""Generate the table part of `pgsidecar/wire/sqlstate.py` from PostgreSQL's errcodes.txt.

The input is `src/backend/utils/errcodes.txt` of the PostgreSQL source tree (a release tarball or
a git checkout of the version wanted); Debian's `postgresql-NN` package installs the same file as
`/usr/share/postgresql/NN/errcodes.txt`. Nothing is downloaded: pass the path.

    python tools/gen_sqlstate.py ERRCODES_TXT            # print the generated part
    python tools/gen_sqlstate.py ERRCODES_TXT --write    # put it below the marker in sqlstate.py
    python tools/gen_sqlstate.py ERRCODES_TXT --check    # exit 1 if sqlstate.py differs

Only the part below the marker line is generated. The hand-written part above it (the module
docstring, which names the errcodes.txt it came from, `name_of`, `class_of`) stays as it is:
update its "Source:" sentence when regenerating from another version.

Constant names are the C macro names without `ERRCODE_` (unique, unlike the condition names);
`NAMES` maps each code to the condition name of its first line that has one; `CLASSES` maps the
two-character class to the title of its `Section:` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SQLSTATE_PY = Path(__file__).resolve().parent.parent / "pgsidecar" / "wire" / "sqlstate.py"
MARKER = "# ---- generated below this line: do not edit ----\n"


@dataclass(slots=True)
class Errcodes:
    """errcodes.txt, read: constants in file order (with their class), names, class titles."""

    constants: list[tuple[str, str, str]] = field(default_factory=list)  # (class, NAME, code)
    names: dict[str, str] = field(default_factory=dict)  # code -> condition name
    classes: dict[str, str] = field(default_factory=dict)  # class -> title


def parse(lines: Iterable[str]) -> Errcodes:
    """Read errcodes.txt: `sqlstate E/W/S ERRCODE_MACRO [spec_name]` lines under `Section:` lines."""
    out = Errcodes()
    head = ""
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("Section:"):
            head, _, title = line.removeprefix("Section: Class ").partition(" - ")
            out.classes[head] = title
            continue
        code, _kind, macro, *spec = line.split()
        out.constants.append((head, macro.removeprefix("ERRCODE_"), code))
        if spec and code not in out.names:
            out.names[code] = spec[0]
    return out


def render(codes: Errcodes) -> str:
    """The text that follows the marker line in sqlstate.py."""
    out: list[str] = []
    for cls, title in codes.classes.items():
        out.append(f"\n# Class {cls}: {title}")
        out += [f'{name} = "{code}"' for of, name, code in codes.constants if of == cls]
    out.append("\n#: SQLSTATE -> PostgreSQL condition name (the PL/pgSQL name).")
    out.append("NAMES: dict[str, str] = {")
    out += [f'    "{code}": "{spec}",' for code, spec in codes.names.items()]
    out.append("}")
    out.append("\n#: SQLSTATE class (first two characters) -> its title.")
    out.append("CLASSES: dict[str, str] = {")
    out += [f'    "{cls}": "{title}",' for cls, title in codes.classes.items()]
    out.append("}")
    return "\n".join(out) + "\n"


def splice(module_text: str, generated: str) -> str:
    """`module_text` with everything below the marker replaced by `generated`."""
    above, marker, _ = module_text.partition(MARKER)
    if not marker:
        raise ValueError(f"no marker line {MARKER.strip()!r} in sqlstate.py")
    return above + marker + generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("errcodes", type=Path, help="PostgreSQL's src/backend/utils/errcodes.txt")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {SQLSTATE_PY.name} in place")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {SQLSTATE_PY.name} differs")
    args = parser.parse_args(argv)
    generated = render(parse(args.errcodes.read_text(encoding="utf-8").splitlines()))
    if not (args.write or args.check):
        sys.stdout.write(generated)
        return 0
    current = SQLSTATE_PY.read_text(encoding="utf-8")
    wanted = splice(current, generated)
    if args.check:
        if wanted != current:
            print(f"{SQLSTATE_PY}: differs from {args.errcodes}", file=sys.stderr)
            return 1
        return 0
    SQLSTATE_PY.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
