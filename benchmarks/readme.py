"""Regenerate every command-line output block of README.md and docs/*.md from the real command (``make readme``).

A block is a fenced code block whose first line is ``$ remat ...``: the command is run (in this process,
as ``remat`` would run it) and the block's body becomes what it prints, stdout then stderr, with the rows of
a long plan table elided in the middle (``...``). ``--check`` changes nothing and exits 1 where a block is
stale; tests/test_cli_readme.py runs the same comparison. Only the wall-clock time of profiling ("in 5.2 s")
may differ between a block and the command's output.

    python benchmarks/readme.py            # rewrite README.md and the docs
    python benchmarks/readme.py --check    # exit 1 and show the difference if a block is stale
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: The files whose blocks are regenerated.
FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]

#: A fenced block whose first line is a remat command.
BLOCK = re.compile(r"^```\n\$ (remat [^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)

#: The wall-clock part of the first line, the only one allowed to differ.
WALL_CLOCK = re.compile(r" in \d+(?:\.\d+)? s(?=;|$)", re.MULTILINE)

#: A row of a plan's table (``12  model.layers.11  checkpoint  1  256.00 MiB``).
TABLE_ROW = re.compile(r"^\d+ {2,}\S")

#: A table of more rows than HEAD + TAIL + 1 is shown as its first HEAD rows, "...", its last TAIL rows.
HEAD, TAIL = 12, 3


@functools.cache
def run(command: str) -> str:
    """What ``command`` (``remat ...``) prints, stdout then stderr, as a README block shows it (run once)."""
    from remat.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(shlex.split(command)[1:])
    return elide(out.getvalue() + err.getvalue())


def elide(text: str) -> str:
    """``text`` with each run of more than ``HEAD + TAIL + 1`` table rows cut to its ends around ``...``."""
    lines, out, rows = text.splitlines(), [], []
    for line in [*lines, ""]:
        if TABLE_ROW.match(line):
            rows.append(line)
            continue
        out += rows if len(rows) <= HEAD + TAIL + 1 else [*rows[:HEAD], "...", *rows[-TAIL:]]
        rows = []
        out.append(line)
    return "\n".join(out[:-1]) + "\n"


def normalized(text: str) -> str:
    """``text`` without the wall-clock time of profiling."""
    return WALL_CLOCK.sub(" in <time> s", text)


def blocks(readme: str) -> list[tuple[str, str]]:
    """``(command, body)`` of each command-line output block of ``readme``."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(readme)]


def regenerated(readme: str) -> str:
    """``readme`` with each command-line output block's body replaced by what the command prints now."""
    return BLOCK.sub(lambda m: f"```\n$ {m.group(1)}\n{run(m.group(1))}```", readme)


def stale(readme: str, name: str = "README.md") -> list[str]:
    """A unified diff per block whose body differs from what its command prints now (wall-clock aside)."""
    diffs = []
    for command, body in blocks(readme):
        now = run(command)
        if normalized(body) != normalized(now):
            diffs.append("".join(difflib.unified_diff(body.splitlines(True), now.splitlines(True),
                                                      f"{name}: $ {command}", "what it prints now")))
    return diffs


def main(argv: list[str]) -> int:
    diffs, count = [], 0
    for path in FILES:
        text = path.read_text()
        count += len(blocks(text))
        if "--check" in argv:
            diffs += stale(text, str(path.relative_to(ROOT)))
        elif blocks(text):
            path.write_text(regenerated(text))
            print(f"regenerated {len(blocks(text))} block(s) of {path.relative_to(ROOT)}")
    if "--check" in argv:
        print("\n".join(diffs) + f"{len(diffs)} of {count} blocks stale" + ("; run `make readme`" if diffs else ""))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
