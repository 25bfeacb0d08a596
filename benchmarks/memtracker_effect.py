"""Does attaching PyTorch's MemTracker change the memory it measures? On a Mamba2 config planned at its least
feasible peak (nested recomputation), one forward and backward is measured by remat's tracker alone, with
MemTracker's module hooks alone attached (a ModTracker), and with MemTracker attached; then again with the
hooks' gradient buffer off. Prints each figure beside the plan's prediction.

What it shows: ModTracker's forward pre-hook calls ``torch.autograd.graph.register_multi_grad_hook(inputs,
fn)`` in its default ``mode="all"``, which keeps every input's gradient in a buffer until the last one has
arrived. A module with several inputs that require grad (Mamba2's mixer, under nested recomputation) then
keeps a gradient alive that the step without the hook frees. With the hook registered in ``mode="any"``
(no buffer), MemTracker reads what remat's tracker alone reads.

    .venv/bin/python benchmarks/memtracker_effect.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.distributed._tools import mod_tracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker

import remat
from remat.planning.solve import min_feasible_plan
from remat.runtime.measure import MemoryTracker
from remat.runtime.model import loss_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust_table import mamba2


def _unbuffered(tensors, fn, mode="all"):  # type: ignore[no-untyped-def]
    """register_multi_grad_hook without the gradient buffer of ``mode="all"``: the pre-hook's function
    only needs to run, ModTracker never reads the gradients it is given."""
    if mode == "all":
        return register_multi_grad_hook(tensors, lambda grad: fn((grad,)), mode="any")
    return register_multi_grad_hook(tensors, fn, mode=mode)


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
    figures = _figures(model, step, tensors)
    mod_tracker.register_multi_grad_hook = _unbuffered
    try:
        unbuffered = _figures(model, step, tensors)
    finally:
        mod_tracker.register_multi_grad_hook = register_multi_grad_hook
    figures |= {f"{k}, hooks without the buffer": v for k, v in unbuffered.items() if k != "remat's tracker alone"}
    print(f"plan: {sum(1 for _ in plan.regions())} regions, predicted peak {plan.prediction.peak_bytes:,} B")
    for name, value in figures.items():
        print(f"{name:66s} {value:>12,} B  ({value / plan.prediction.peak_bytes - 1:+.2%} vs predicted)")


def _figures(model, step, tensors):  # type: ignore[no-untyped-def]
    figures = {}
    for attached in ("none", "ModTracker", "MemTracker"):
        for p in model.parameters():
            p.grad.zero_()
        ours = MemoryTracker()
        ours.track_model(model)
        ours.track(tensors)
        ref = MemTracker()
        if attached == "ModTracker":  # MemTracker's module hooks alone, nothing allocated or tracked by them
            with ModTracker(), ours:
                step()
            figures["remat's tracker, ModTracker attached"] = ours.peak_bytes
        elif attached == "MemTracker":
            ref.track_external(model, *tensors)
            with ref, ours:
                step()
            figures["MemTracker, attached"] = int(ref.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
            figures["remat's tracker, MemTracker attached"] = ours.peak_bytes
        else:
            with ours:
                step()
            figures["remat's tracker alone"] = ours.peak_bytes
    return figures


if __name__ == "__main__":
    main()
