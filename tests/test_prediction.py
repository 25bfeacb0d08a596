"""The predicted peak is never below the measured one, with the safety margin switched off, for the plan
shapes that recompute norm statistics: a one-block region (its recomputation copies the block's
BatchNorm running statistics before it runs) and one region over a long run of blocks (it holds the
copies of all of them until the last block has run again)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch

import remat
from remat import Profile, simulate
from remat.planning.plan import Item, Record, Region
from remat.planning.solve import make_plan
from remat.planning.strategies import runs

from .test_zoo import _forward_backward, _seed, _tensors
from .zoo_models import ZOO


def _with_regions(prof: Profile, spans: list[tuple[int, int]]) -> tuple[Item, ...]:
    """Records everywhere but the regions ``[a, b)`` of ``spans``, each recomputed by records."""
    items: list[Item] = []
    k = 0
    while k < len(prof.stages):
        span = next((s for s in spans if s[0] == k), None)
        if span is None:
            items.append(Record(k))
            k += 1
        else:
            items.append(Region(span[0], span[1], tuple(Record(m) for m in range(*span))))
            k = span[1]
    return tuple(items)


def _shapes(prof: Profile) -> dict[str, list[tuple[int, int]]]:
    """Every block its own region, each block alone, and one region per run of blocks that may share one."""
    blocks = prof.block_indices()
    shapes = {"every": [(b, b + 1) for b in blocks]}
    shapes |= {f"only{b}": [(b, b + 1)] for b in blocks}
    shapes |= {f"run{a}-{b}": [(a, b)] for a, b in runs(prof) if b - a >= 2}
    return shapes


def _measured(model: torch.nn.Module, prof: Profile, items: tuple[Item, ...], inputs: Any, loss_fn: Any) -> int:
    planned = copy.deepcopy(model)
    remat.apply(planned, make_plan(prof, list(items), strategy="by hand", budget_bytes=None))
    step = remat.measure(lambda: _forward_backward(planned, inputs, loss_fn), model=planned,
                         inputs=_tensors(inputs), repeats=0)
    return step.peak_bytes


@pytest.mark.parametrize("name", ["densenet", "mobilenet_v3"])
def test_regions_recomputing_norm_statistics_are_never_under_predicted(name: str) -> None:
    torch.manual_seed(0)
    model, inputs, loss_fn = ZOO[name]()
    pristine = copy.deepcopy(model)
    _seed()
    prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=1, progress=False)
    assert any(s.recompute_copy_bytes > 0 for s in prof.stages)  # BatchNorm blocks: their statistics are copied
    bare = dataclasses.replace(prof, safety_fraction=0.0)
    shapes = _shapes(prof)
    assert any(name.startswith("run") for name in shapes)
    under = {}
    for label, spans in shapes.items():
        items = _with_regions(prof, spans)
        predicted = simulate(bare, items).peak_bytes
        measured = _measured(pristine, prof, items, inputs, loss_fn)
        if measured > predicted:
            under[label] = measured - predicted
    assert not under, f"{name}: measured peak above the prediction (bytes): {under}"
