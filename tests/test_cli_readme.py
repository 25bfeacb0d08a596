"""The command-line output blocks of README.md and docs/*.md are what the commands print now (benchmarks/readme.py,
`make readme`)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def readme():
    spec = importlib.util.spec_from_file_location("readme_blocks", ROOT / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_readme_block_is_what_its_command_prints_now(readme):
    """The llama-7b block on meta (run once for README.md and docs/reading-a-plan.md) and a refusal: seconds.
    Only the time profiling took may differ."""
    texts = {path.relative_to(ROOT): path.read_text() for path in readme.FILES}
    commands = [command for text in texts.values() for command, _ in readme.blocks(text)]
    assert any(c.startswith("remat plan llama-7b") for c in commands) and len(commands) >= 3, commands
    diffs = [diff for name, text in texts.items() for diff in readme.stale(text, str(name))]
    assert not diffs, "stale blocks; run `make readme`:\n" + "\n".join(diffs)


def test_a_changed_figure_is_stale_and_only_the_wall_clock_may_differ(readme, monkeypatch):
    now = "m: a model; profiled on meta (no memory used) in 5.2 s\npredicted peak 79.16 GiB\n"
    monkeypatch.setattr(readme, "run", lambda command: now)
    block = "```\n$ remat plan m --budget 1GiB\n{}```\n"
    assert readme.stale(block.format(now.replace("5.2 s", "12.9 s"))) == []
    diffs = readme.stale(block.format(now.replace("79.16", "77.90")))
    assert len(diffs) == 1 and "-predicted peak 77.90 GiB" in diffs[0] and "+predicted peak 79.16 GiB" in diffs[0]
    assert readme.regenerated(block.format("old\n")) == block.format(now)


def test_long_tables_are_elided_in_the_middle(readme):
    rows = [f"{i:<3} model.layers.{i}  keep  0  1 B" for i in range(20)]
    text = "\n".join(["title", *rows, "    total", "", "verdict"]) + "\n"
    lines = readme.elide(text).splitlines()
    assert lines == ["title", *rows[:readme.HEAD], "...", *rows[-readme.TAIL:], "    total", "", "verdict"]
    short = "\n".join(["title", *rows[:5], "end"]) + "\n"
    assert readme.elide(short) == short
