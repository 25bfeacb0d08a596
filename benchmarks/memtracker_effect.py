"""Does attaching PyTorch's MemTracker change the memory it measures? On a Mamba2 config planned at its least
feasible peak (nested recomputation), one forward and backward is measured by remat's tracker alone, and by
remat's tracker and MemTracker attached together. Prints the three figures beside the plan's prediction.

    .venv/bin/python benchmarks/memtracker_effect.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker

import remat
from remat.planning.solve import min_feasible_plan
from remat.runtime.measure import MemoryTracker
from remat.runtime.model import loss_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust_table import mamba2


def main() -> None:
    torch.set_num_threads(1)
    model, inputs = mamba2()
    get_loss = loss_function(None)
    plan = min_feasible_plan(remat.profile(model, inputs, repeats=1))
    remat.apply(model, plan)
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]

    def step() -> None:
        out = model(**inputs)  # held through backward, as a loop holds it
        get_loss(out).backward()

    step()  # gradients allocated
    figures = {}
    for with_memtracker in (False, True):
        for p in model.parameters():
            p.grad.zero_()
        ours = MemoryTracker()
        ours.track_model(model)
        ours.track(tensors)
        ref = MemTracker()
        if with_memtracker:
            ref.track_external(model, *tensors)
            with ref, ours:
                step()
            figures["MemTracker, attached"] = int(ref.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
            figures["remat's tracker, MemTracker attached"] = ours.peak_bytes
        else:
            with ours:
                step()
            figures["remat's tracker alone"] = ours.peak_bytes
    print(f"plan: {sum(1 for _ in plan.regions())} regions, predicted peak {plan.prediction.peak_bytes:,} B")
    for name, value in figures.items():
        print(f"{name:40s} {value:>12,} B  ({value / plan.prediction.peak_bytes - 1:+.2%} vs predicted)")


if __name__ == "__main__":
    main()
