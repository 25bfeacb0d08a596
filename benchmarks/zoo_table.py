"""Per model of the acceptance zoo (tests/zoo_models.py), on the CPU: the stages found without
``stages=``, the predicted peak without checkpointing and at the smallest feasible budget, and for the
min-feasible plan its predicted and measured peak and whether the step gave the plain model's loss and
gradients bit for bit.

    .venv/bin/python benchmarks/zoo_table.py [name ...]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_zoo import _forward_backward, _seed, _step, _tensors
from tests.zoo_models import ZOO

import remat
from remat import RematError, simulate, solve
from remat.planning.solve import min_feasible_plan


def _stages(prof: remat.Profile) -> str:
    blocks = [s.name for s in prof.stages if s.kind == "block"]
    glue = sum(1 for s in prof.stages if s.kind == "glue")
    span = blocks[0] if len(blocks) == 1 else f"{blocks[0]} .. {blocks[-1]}"
    return f"{len(blocks)} (+{glue} glue): {span}"


def _same(plain: torch.nn.Module, planned: torch.nn.Module) -> bool:
    pairs = list(zip(plain.parameters(), planned.parameters()))
    grads = all((p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
                for p, q in pairs)
    buffers = all(torch.equal(a, b) for a, b in zip(plain.buffers(), planned.buffers()))
    return grads and buffers


def row(name: str) -> str:
    model, inputs, loss_fn = ZOO[name]()
    pristine = copy.deepcopy(model)
    _seed()
    try:
        prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=1)
    except RematError as e:
        return f"| {name} | refused: {str(e)[:160]} | | | | | |"
    none = simulate(prof, solve(prof, None, strategy="none")).peak_bytes
    plan = min_feasible_plan(prof)
    plain, planned = copy.deepcopy(pristine), copy.deepcopy(pristine)
    remat.apply(planned, plan)
    loss_plain = _step(plain, inputs, loss_fn)
    loss_planned = _step(planned, inputs, loss_fn)
    same = bool(torch.equal(loss_plain, loss_planned)) and _same(plain, planned)

    def step() -> Any:
        _forward_backward(planned, inputs, loss_fn)

    measured = remat.measure(step, model=planned, inputs=_tensors(inputs), repeats=0).peak_bytes
    ok = "yes" if measured <= plan.peak_bytes else "NO"
    return (f"| {name} | {_stages(prof)} | {none:,} | {plan.peak_bytes:,} ({plan.peak_bytes / none:.0%}) |"
            f" {measured:,} | {ok} | {'yes' if same else 'NO'} |")


def main(names: list[str]) -> None:
    print("| model | stages found (blocks, glue: first .. last) | no-checkpointing peak, predicted (B) |"
          " min-feasible peak, predicted (B) | min-feasible, measured (B) | measured <= predicted |"
          " loss, grads, buffers bitwise equal |")
    print("|---|---|---|---|---|---|---|")
    for name in names or list(ZOO):
        print(row(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
