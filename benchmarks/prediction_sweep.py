"""Is any plan's predicted peak below its measured peak? Per model of the acceptance zoo (tests/zoo_models.py),
on the CPU, with block options (:func:`remat.add_options`): plans of every shape — every block alone in a
region, every block, every 2nd block, one region over two blocks and over each run of blocks, each option
on every block that has it (alone and beside regions), and the optimal plans at six budgets — each run and
measured (:func:`remat.measure`, exact bytes), against the prediction *without* the profile's safety margin.

    .venv/bin/python benchmarks/prediction_sweep.py [name ...]

Prints one line per plan (measured - predicted: positive is an under-prediction, the bug this looks for)
and the worst per shape; exits 1 if any plan is under or fails to run.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_zoo import _forward_backward, _seed, _tensors
from tests.zoo_models import ZOO

import remat
from remat import simulate, solve
from remat.planning.plan import Item, Record, Region, Selective
from remat.planning.solve import make_plan, min_feasible_plan
from remat.planning.strategies import runs
from remat.runtime.ops import add_options


def shape(items: tuple[Item, ...]) -> str:
    """nested (a region whose body holds a region or an option), multi (a region over several blocks),
    selective, selective+region, or single (one-block regions only)."""
    regions = [it for it in items if isinstance(it, Region)]
    if any(isinstance(b, (Region, Selective)) for r in regions for b in r.body):
        return "nested"
    if any(r.stop - r.start > 1 for r in regions):
        return "multi"
    if any(isinstance(it, Selective) for it in items):
        return "selective+region" if regions else "selective"
    return "single"


def _items(n: int, regions: list[tuple[int, int]], options: dict[int, Any] | None = None) -> tuple[Item, ...]:
    out: list[Item] = []
    i = 0
    while i < n:
        r = next((r for r in regions if r[0] == i), None)
        if r is not None:
            out.append(Region(r[0], r[1], tuple(Record(k) for k in range(*r))))
            i = r[1]
            continue
        o = (options or {}).get(i)
        out.append(Selective(i, o.name, o.save) if o is not None else Record(i))
        i += 1
    return tuple(out)


def plans(prof: remat.Profile) -> Iterator[tuple[str, tuple[Item, ...]]]:
    n, blocks = len(prof.stages), prof.block_indices()
    yield "every", _items(n, [(b, b + 1) for b in blocks])
    yield "every 2nd", _items(n, [(b, b + 1) for b in blocks[::2]])
    for b in blocks:
        yield f"only {b}", _items(n, [(b, b + 1)])
    for a, z in runs(prof):
        if z - a >= 2:
            yield f"region {a}..{a + 1}", _items(n, [(a, a + 2)])
        if z - a >= 3:
            yield f"region {a}..{z - 1}", _items(n, [(a, z)])
    for name in sorted({o.name for s in prof.stages for o in s.options}):
        opts = {b: o for b in blocks for o in prof.stages[b].options if o.name == name}
        yield f"option {name}", _items(n, [], opts)
        half = list(blocks[::2])
        yield f"option {name} + regions", _items(n, [(b, b + 1) for b in half],
                                                 {k: v for k, v in opts.items() if k not in half})
    low = min_feasible_plan(prof).peak_bytes
    high = simulate(prof, solve(prof, None, strategy="none")).peak_bytes
    for share in (0.0, 0.1, 0.3, 0.5, 0.8, 0.97):
        yield f"optimal {share:.0%}", solve(prof, int(low + share * (high - low))).items


def sweep(name: str) -> list[tuple[int, str, str, str]]:
    """(measured - predicted, model, plan, shape) for every plan of one model."""
    model, inputs, loss_fn = ZOO[name]()
    pristine = copy.deepcopy(model)
    _seed()
    prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=1, progress=False)
    prof = add_options(prof, model, inputs, repeats=1)
    exact = dataclasses.replace(prof, safety_fraction=0.0)
    out = []
    for label, items in plans(prof):
        planned = copy.deepcopy(pristine)
        remat.apply(planned, make_plan(prof, list(items), strategy="sweep", budget_bytes=None))
        measured = remat.measure(lambda m=planned: _forward_backward(m, inputs, loss_fn), model=planned,
                                 inputs=_tensors(inputs), repeats=0).peak_bytes
        predicted = simulate(exact, items).peak_bytes
        out.append((measured - predicted, name, label, shape(items)))
        print(f"{name:34s} {label:28s} {shape(items):16s} predicted {predicted:>12,} B  measured - predicted"
              f" {measured - predicted:+,} B{'  UNDER' if measured > predicted else ''}", flush=True)
    return out


def main(names: list[str]) -> int:
    rows, failed = [], []
    for name in names or list(ZOO):
        try:
            rows += sweep(name)
        except Exception:
            failed.append(name)
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
    print(f"\n{len(rows)} plans on {len(names or ZOO) - len(failed)} models; worst per shape"
          " (measured - predicted, B):")
    for sh in sorted({r[3] for r in rows}):
        worst = max(r for r in rows if r[3] == sh)
        print(f"  {sh:16s} {sum(r[3] == sh for r in rows):4d} plans, worst {worst[0]:+,} ({worst[1]}, {worst[2]})")
    under = [r for r in rows if r[0] > 0]
    print(f"under-predicted: {len(under)}; failed to run: {failed or 'none'}")
    return 1 if under or failed else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main(sys.argv[1:]))
